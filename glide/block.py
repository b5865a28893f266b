"""The block size: the unit the cache, the flusher and the store formats count in.

Owns BLOCK_SIZE, taken from the native extension (native/ fixes the block
size at build time: the block index, the WAL and the state file count in it)
so Python and C cannot disagree. Everything in glide/ that means "one block"
imports it from here.

Invariant: BLOCK_SIZE is 4096. The durable formats fix it (a pack's raw
payload is 4096 bytes, a manifest root's `block_size` must be 4096, format
version 1 of both), so an extension built with another size is refused at
import rather than allowed to write stores that nothing else reads.
"""

from __future__ import annotations

from typing import Final

from glide import _native

BLOCK_SIZE: Final[int] = _native.BLOCK_SIZE

if BLOCK_SIZE != 4096:
    raise ImportError(f"glide._native was built with a block size of {BLOCK_SIZE} bytes; the "
                      "pack and manifest formats (version 1) store 4096-byte blocks: rebuild "
                      "the extension from this tree")
