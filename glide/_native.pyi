# glide/_native.pyi — the typed contract of the C extension (native/module.c).
#
# Every public name the extension exports is declared here and nothing else
# (tests/unit/test_native_stub.py checks both directions). Names starting
# with an underscore exist only in this stub: the shapes of returned dicts.
# Offsets and lengths are bytes, lba/n are blocks of BLOCK_SIZE bytes, seq
# values are WAL sequence numbers; calls that may block release the GIL.
# Errors: OSError with errno for I/O, ValueError for bad arguments or a
# closed volume.

from collections.abc import Sequence
from typing import Final, TypedDict

from typing_extensions import Buffer  # collections.abc.Buffer is 3.12+

BLOCK_SIZE: Final[int]  # 4096
MAX_IO: Final[int]  # largest single request payload: 32 MiB
WAL_KIND_DATA: Final[int]
WAL_KIND_ZERO_HOLE: Final[int]
WAL_KIND_ZERO_ALLOC: Final[int]
# Upper bounds in seconds of Volume.metrics()'s latency buckets (+Inf implied):
# 1e-05, 2.5e-05, 5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0
LATENCY_BUCKETS: Final[tuple[float, ...]]

class _CheckpointStats(TypedDict):
    cut_seq: int
    blocks_written: int
    blocks_zeroed: int
    blocks_bypassed: int
    state_bytes: int

class _WriteBackStats(TypedDict):
    cut_seq: int
    blocks_written: int
    blocks_zeroed: int
    blocks_bypassed: int

class _Stats(TypedDict):
    size: int
    dirty_blocks: int
    versions: int
    wal_bytes: int
    charge: int
    budget: int
    last_seq: int
    synced_seq: int
    checkpoint_seq: int
    reads: int
    writes: int
    flushes: int
    trims: int
    zeroes: int
    read_bytes: int
    write_bytes: int
    wal_syncs: int
    backpressure_waits: int
    checkpoints: int
    connections: int
    failed: int  # sticky errno after an unrecoverable I/O error, else 0
    replayed_records: int
    replay_discarded_bytes: int
    replay_segments: int
    errors: int
    misses: int
    installs: int
    fetch_failures: int
    evictions: int
    cached_blocks: int

class _OpMetrics(TypedDict):
    requests: int  # == sum(buckets)
    bytes: int  # of requests that succeeded
    errors: int
    buckets: tuple[int, ...]  # 13 non-cumulative counts: LATENCY_BUCKETS, then +Inf
    sum_ns: int

class _Metrics(TypedDict):
    ops: dict[str, _OpMetrics]  # read, write, flush, trim, write_zeroes
    inflight: int
    cache_hits: int  # blocks guest reads got from the cache file or the WAL
    cache_misses: int  # blocks that had to come from the store
    cache_evicted_bytes: int

class _WalRecord(TypedDict):
    kind: int
    seq: int
    lba: int
    nblocks: int
    size: int  # header and data

class _NbdRequestCheck(TypedDict):
    flags: int
    type: int
    handle: int
    offset: int
    length: int
    verdict: str  # "execute", "reject" or "disconnect"
    error: int  # NBD error code for a reject

class Volume:
    """One volume of the write cache: WAL, block index, cache file."""

    def __init__(
        self,
        path: str,
        size: int,
        wal_budget: int = 1 << 30,
        segment_size: int = 64 << 20,
        passive: bool = False,
    ) -> None:
        """Open or create. A size larger than the state file's grows the
        volume; a smaller one is ValueError. passive: a handoff successor's
        open of a volume another process still serves: replays its WAL and
        changes nothing on disk until activate() (writes, flush, checkpoint,
        grow, evict, install and exports raise OSError(EROFS))."""

    @property
    def size(self) -> int: ...
    @property
    def passive(self) -> bool: ...
    def close(self) -> None: ...
    # --- I/O -----------------------------------------------------------------
    def read(self, offset: int, length: int, /) -> bytes: ...
    def write(self, offset: int, data: Buffer, fua: bool = False) -> int:
        """Returns the WAL sequence number to wait on (0: nothing changed)."""
    def trim(self, offset: int, length: int, fua: bool = False) -> int: ...
    def write_zeroes(
        self, offset: int, length: int, no_hole: bool = False, fua: bool = False
    ) -> int: ...
    def flush(self) -> None: ...
    def block_status(self, offset: int, length: int, /) -> list[tuple[int, int]]:
        """(length, NBD base:allocation flags) extents."""
    def grow(self, new_size: int, /) -> None:
        """Online; durable on return. A multiple of BLOCK_SIZE, not smaller
        (ValueError); equal is a no-op."""
    # --- WAL, checkpoint, flush ------------------------------------------------
    def last_seq(self) -> int: ...
    def checkpoint(self, upto: int = ..., bypass: int = 0) -> _CheckpointStats:
        """Write back, drop versions <= the cut, persist the state file,
        retire the WAL. bypass > 0 promises the cut is committed to the
        store: blocks a write-back left out (runs of >= bypass data blocks)
        become ABSENT. bypass = 0 copies any such blocks first."""
    def write_back(self, upto: int = ..., bypass: int = 0) -> _WriteBackStats:
        """A checkpoint's copy into the cache file, changing no state; runs
        of >= bypass consecutive data blocks (bypass > 0) are not copied but
        marked for the checkpoint after the commit."""
    def cancel_write_back(self) -> None:
        """write_back/checkpoint, running or later, raise InterruptedError
        within one copy batch until allow_write_back()."""
    def allow_write_back(self) -> None: ...
    def read_block_as_of(self, lba: int, seq: int, /) -> bytes: ...
    def flush_cut(self) -> int: ...
    def dirty_upto(self, cut: int, /) -> list[tuple[int, int]]:
        """(lba, WAL kind) of blocks whose newest version <= cut."""
    def local_only_blocks(self) -> list[int]: ...
    def pressure_fd(self) -> int: ...
    # --- the handoff successor (passive=True) ---------------------------------
    def catch_up(self) -> tuple[int, int]:
        """(records applied, WAL bytes read) since the last call; a record
        still being written waits for the next one."""
    def activate(self) -> None:
        """The writer has stopped, fdatasynced and closed: a last catch-up,
        then an ordinary open volume. OSError(ESTALE) if the state file
        changed since the passive open."""
    # --- the object-store side ------------------------------------------------
    def set_remote(self, lba: int, n: int, on: bool = True, /) -> None: ...
    def miss_fd(self) -> int: ...
    def take_misses(self, max: int = 256, /) -> list[int]: ...
    def install(self, lba: int, block: Buffer, /) -> None: ...
    def fail_miss(self, lba: int, errno: int = ..., /) -> None: ...
    def evict(self, lba: int, n: int, /) -> int: ...
    def evict_to(self, max_cached_blocks: int, /) -> int: ...
    def set_wal_budget(self, budget: int, /) -> None:
        """Writers waiting for WAL space re-check against the new budget."""
    def set_read_only(self) -> None: ...
    # --- exports ---------------------------------------------------------------
    def serve_nbd(
        self,
        fd: int,
        structured: bool = False,
        meta_id: int = 0,
        initial: Buffer = b"",
        export_size: int = 0,
        pending_out: Buffer = b"",
    ) -> None:
        """Takes ownership of fd (after the handshake). export_size: what the
        handshake announced, the connection's bound for life (0: now).
        pending_out: bytes sent before any reply (a resumed connection's)."""
    def detach_nbd(
        self, timeout_ms: int, /
    ) -> list[tuple[int, bool, int, int, bytes, bytes]]:
        """Every NBD connection stopped at a request boundary, its socket left
        open: (fd, structured, meta_id, export_size, unconsumed_in,
        unsent_out), resumed by serve_nbd(fd, structured, meta_id,
        unconsumed_in, export_size, unsent_out). TimeoutError: none detached,
        all keep being served."""
    def shutdown_connections(self, grace_ms: int = 5000, /) -> None: ...
    def attach_ublk(
        self, dev_id: int = -1, queues: int = 1, depth: int = 64, max_io: int = 524288
    ) -> tuple[int, bool]:
        """(device id, recovered)."""
    def detach_ublk(self, remove: bool = False, /) -> None: ...
    def ublk_update_size(self) -> bool:
        """False when the kernel cannot resize a ublk device (Linux < 6.16)."""
    # --- observability -----------------------------------------------------------
    def stats(self) -> _Stats: ...
    def metrics(self) -> _Metrics:
        """Monotonic for the life of the object (after close: final counts)."""

def ublk_probe() -> tuple[bool, str]: ...
def unshare_mounts() -> None: ...
def crc32c(data: Buffer, crc: int = 0, software: bool = False, /) -> int: ...
def build_pack(
    volume: Volume, lbas: Sequence[int], as_of: int, level: int = 1, threads: int = 2
) -> tuple[bytes, list[int]]:
    """(pack bytes, entry index or -1 per lba); b'' when no block needs storing."""
def encode_wal_record(
    kind: int, seq: int, lba: int, nblocks: int, data: Buffer = b"", /
) -> bytes: ...
def decode_wal_record(buf: Buffer, /) -> _WalRecord | None: ...
def check_nbd_request(
    buf: Buffer, export_size: int, structured: bool = False, meta_id: int = 0, /
) -> _NbdRequestCheck | None: ...
