"""WAL record codec, CRC-32C and NBD request validation: the pure C parsers."""

from __future__ import annotations

import os
import struct

import pytest

from glide import _native

BS = 4096


def test_crc32c_known_vector_and_hw_matches_table() -> None:
    assert _native.crc32c(b"123456789") == 0xE3069283
    assert _native.crc32c(b"123456789", 0, True) == 0xE3069283
    for n in (0, 1, 7, 8, 9, 63, 4096, 4099):
        data = os.urandom(n)
        assert _native.crc32c(data) == _native.crc32c(data, 0, True)
    # chaining equals one pass
    a, b = os.urandom(100), os.urandom(200)
    assert _native.crc32c(b, _native.crc32c(a)) == _native.crc32c(a + b)


def test_wal_record_roundtrip() -> None:
    data = os.urandom(2 * BS)
    rec = _native.encode_wal_record(_native.WAL_KIND_DATA, 7, 100, 2, data)
    assert len(rec) == 32 + 2 * BS
    d = _native.decode_wal_record(rec)
    assert d == {"kind": 1, "seq": 7, "lba": 100, "nblocks": 2, "size": len(rec)}
    z = _native.encode_wal_record(_native.WAL_KIND_ZERO_HOLE, 8, 5, 1000)
    assert _native.decode_wal_record(z)["nblocks"] == 1000
    # a record followed by more bytes decodes as itself
    assert _native.decode_wal_record(rec + b"junk")["size"] == len(rec)


def test_wal_record_detects_every_single_byte_flip() -> None:
    rec = bytearray(_native.encode_wal_record(_native.WAL_KIND_DATA, 3, 9, 1, os.urandom(BS)))
    for pos in list(range(32)) + [32, 100, 2000, len(rec) - 1]:
        bad = bytearray(rec)
        bad[pos] ^= 0x40
        try:
            out = _native.decode_wal_record(bytes(bad))
        except ValueError:
            continue
        # flipping a length byte can only make it "short", never valid
        assert out is None, f"flip at {pos} went undetected"


def test_wal_record_short_and_hostile_headers() -> None:
    rec = _native.encode_wal_record(_native.WAL_KIND_DATA, 3, 9, 1, bytes(BS))
    for cut in (0, 10, 31, 32, 100, len(rec) - 1):
        assert _native.decode_wal_record(rec[:cut]) is None
    hdr = bytearray(rec[:32])
    struct.pack_into("<I", hdr, 24, 0xFFFFFFFF)  # absurd block count
    with pytest.raises(ValueError):
        _native.decode_wal_record(bytes(hdr))
    with pytest.raises(ValueError):
        _native.decode_wal_record(b"\x00" * 64)
    with pytest.raises(ValueError):
        _native.encode_wal_record(_native.WAL_KIND_DATA, 1, 0, 1, b"short")


def req(cmd: int, off: int, length: int, flags: int = 0, handle: int = 1) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, off, length)


SIZE = 1 << 30


@pytest.mark.parametrize(
    "cmd,off,length,flags,verdict,error",
    [
        (0, 0, 4096, 0, "execute", 0),
        (0, SIZE - 4096, 8192, 0, "reject", 22),  # read past the end: EINVAL
        (1, SIZE - 4096, 8192, 0, "reject", 28),  # write past the end: ENOSPC
        (6, SIZE, 1, 0, "reject", 28),  # write zeroes past the end: ENOSPC
        (4, SIZE, 1, 0, "reject", 22),  # trim past the end: EINVAL
        (0, 2**64 - 1, 2, 0, "reject", 22),  # offset + length wraps
        (0, 0, (32 << 20) + 1, 0, "reject", 22),  # read over the maximum
        (1, 0, 0xFFFFFFFF, 0, "disconnect", 22),  # hostile write length
        (99, 0, 0, 0, "reject", 22),  # unknown command
        (0, 0, 4096, 0x8000, "reject", 22),  # unknown flag
        (3, 0, 0, 1, "reject", 22),  # FUA on FLUSH is not applicable
        (1, 0, 4096, 1, "execute", 0),  # FUA on WRITE
        (6, 0, 4096, 0x13, "execute", 0),  # FUA|NO_HOLE|FAST_ZERO
        (7, 0, 4096, 0, "reject", 22),  # BLOCK_STATUS without a context
    ],
)
def test_nbd_validation(cmd, off, length, flags, verdict, error) -> None:
    r = _native.check_nbd_request(req(cmd, off, length, flags), SIZE)
    assert (r["verdict"], r["error"]) == (verdict, error)


def test_nbd_block_status_needs_context_and_structured() -> None:
    assert _native.check_nbd_request(req(7, 0, 4096), SIZE, True, 1)["verdict"] == "execute"
    assert _native.check_nbd_request(req(7, 0, 4096), SIZE, False, 1)["verdict"] == "reject"


def test_nbd_parse_short_and_bad_magic() -> None:
    assert _native.check_nbd_request(req(0, 0, 1)[:27], SIZE) is None
    with pytest.raises(ValueError):
        _native.check_nbd_request(b"\xff" * 28, SIZE)
