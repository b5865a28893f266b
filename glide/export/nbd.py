"""NBD fixed-newstyle handshake (option haggling), then hand the socket to C.

Owns: everything on an NBD connection before the transmission phase. Keeps:
  - every option payload is read in full (or the connection is dropped), so
    the stream never desynchronises; lengths are bounded before reading;
  - an unknown or malformed option gets the NBD_REP_ERR_* the spec names and
    the connection stays usable; only broken framing ends it;
  - the socket reaches C with exactly the bytes of the transmission phase
    unread (we read exact lengths, never ahead).
Values are the NBD protocol's (doc/proto.md of the NBD project).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("glide.nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# FLUSH and FUA are global (one WAL per volume), so several connections to one
# export see each other's flushes: CAN_MULTI_CONN is a true promise.
TRANSMISSION_FLAGS = (
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE | TFLAG_SEND_FAST_ZERO
)

BASE_ALLOCATION = b"base:allocation"
META_ID_BASE_ALLOCATION = 1
# Unaligned requests are read-modify-written, so the minimum is 1 (the
# default): clients that never ask for block sizes stay correct.
MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD = 1, 4096, 32 << 20
MAX_OPTION_LEN = 64 * 1024  # far above any legitimate option; bigger is hostile
MAX_STRING = 4096


class HandshakeAbort(Exception):
    """The connection ends here (client abort, broken framing, or EOF)."""


@dataclass
class Export:
    name: str
    size: int
    attach: Callable[[int, bool, int], None]  # (fd, structured, meta_id)
    description: str = ""


@dataclass
class Negotiated:
    structured: bool = False
    meta_export: str | None = None  # export name SET_META_CONTEXT referred to
    meta_on: bool = False


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise HandshakeAbort("client closed the connection")
        got += k
    return bytes(buf)


class Handshake:
    """One connection's option haggling."""

    def __init__(self, sock: socket.socket, exports: dict[str, Export], default: str) -> None:
        self.sock = sock
        self.exports = exports
        self.default = default
        self.loop = asyncio.get_running_loop()
        self.neg = Negotiated()
        self.no_zeroes = False

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def lookup(self, name: str) -> Export | None:
        return self.exports.get(name or self.default)

    async def run(self) -> tuple[Export, Negotiated] | None:
        flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        await self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        (cflags,) = struct.unpack(">I", await _recv_exact(self.loop, self.sock, 4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise HandshakeAbort(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", await _recv_exact(self.loop, self.sock, 16))
            if magic != IHAVEOPT:
                raise HandshakeAbort("bad option magic")
            if length > MAX_OPTION_LEN:
                # Reading it to stay in sync is the attack; refuse and hang up.
                await self.reply(opt, REP_ERR_TOO_BIG)
                raise HandshakeAbort(f"option {opt} length {length} too large")
            data = await _recv_exact(self.loop, self.sock, length) if length else b""
            done = await self.option(opt, data)
            if done is not None:
                return done

    async def option(self, opt: int, data: bytes) -> tuple[Export, Negotiated] | None:
        if opt == OPT_EXPORT_NAME:
            exp = self.lookup(data.decode("utf-8", "replace"))
            if exp is None:
                raise HandshakeAbort("EXPORT_NAME for an unknown export")
            tail = b"" if self.no_zeroes else bytes(124)
            await self.send(struct.pack(">QH", exp.size, TRANSMISSION_FLAGS) + tail)
            return exp, self.neg
        if opt == OPT_ABORT:
            try:
                await self.reply(opt, REP_ACK)
            except OSError:
                pass
            raise HandshakeAbort("client aborted")
        if opt == OPT_LIST:
            if data:
                await self.reply(opt, REP_ERR_INVALID)
                return None
            for name in self.exports:
                raw = name.encode()
                await self.reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
            await self.reply(opt, REP_ACK)
            return None
        if opt in (OPT_INFO, OPT_GO):
            return await self.info_go(opt, data)
        if opt == OPT_STRUCTURED_REPLY:
            if data:
                await self.reply(opt, REP_ERR_INVALID)
                return None
            self.neg.structured = True
            await self.reply(opt, REP_ACK)
            return None
        if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            await self.meta_context(opt, data)
            return None
        # STARTTLS, EXTENDED_HEADERS and anything unknown.
        await self.reply(opt, REP_ERR_UNSUP)
        return None

    async def info_go(self, opt: int, data: bytes) -> tuple[Export, Negotiated] | None:
        if len(data) < 6:
            await self.reply(opt, REP_ERR_INVALID)
            return None
        (namelen,) = struct.unpack_from(">I", data, 0)
        if namelen > len(data) - 6 or namelen > MAX_STRING:
            await self.reply(opt, REP_ERR_INVALID)
            return None
        name = data[4:4 + namelen].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * nreq:
            await self.reply(opt, REP_ERR_INVALID)
            return None
        requests = set(struct.unpack_from(f">{nreq}H", data, 6 + namelen)) if nreq else set()
        exp = self.lookup(name)
        if exp is None:
            msg = f"no export named {name!r}".encode()
            await self.reply(opt, REP_ERR_UNKNOWN, msg)
            return None
        info = struct.pack(">HQH", INFO_EXPORT, exp.size, TRANSMISSION_FLAGS)
        await self.reply(opt, REP_INFO, info)
        if INFO_NAME in requests:
            await self.reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in requests and exp.description:
            await self.reply(
                opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode()
            )
        await self.reply(
            opt, REP_INFO,
            struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD),
        )
        await self.reply(opt, REP_ACK)
        return (exp, self.neg) if opt == OPT_GO else None

    async def meta_context(self, opt: int, data: bytes) -> None:
        if opt == OPT_SET_META_CONTEXT and not self.neg.structured:
            await self.reply(opt, REP_ERR_INVALID, b"structured replies must be negotiated first")
            return
        try:
            (namelen,) = struct.unpack_from(">I", data, 0)
            if namelen > MAX_STRING:
                raise ValueError
            name = data[4:4 + namelen].decode("utf-8", "replace")
            pos = 4 + namelen
            (nq,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > MAX_STRING or pos + qlen > len(data):
                    raise ValueError
                queries.append(data[pos:pos + qlen])
                pos += qlen
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError):
            await self.reply(opt, REP_ERR_INVALID)
            return
        if self.lookup(name) is None:
            await self.reply(opt, REP_ERR_UNKNOWN)
            return
        if opt == OPT_LIST_META_CONTEXT:
            match = not queries or any(q in (b"base:", BASE_ALLOCATION) for q in queries)
            if match:
                await self.reply(opt, REP_META_CONTEXT, struct.pack(">I", 0) + BASE_ALLOCATION)
        else:
            self.neg.meta_on = BASE_ALLOCATION in queries
            self.neg.meta_export = name or self.default
            if self.neg.meta_on:
                ctx = struct.pack(">I", META_ID_BASE_ALLOCATION) + BASE_ALLOCATION
                await self.reply(opt, REP_META_CONTEXT, ctx)
        await self.reply(opt, REP_ACK)


async def negotiate_and_attach(
    sock: socket.socket, exports: dict[str, Export], default: str, timeout: float
) -> None:
    """Run the handshake on an accepted socket; on success C owns the socket."""
    peer = "unix" if sock.family == socket.AF_UNIX else str(sock.getpeername())
    try:
        async with asyncio.timeout(timeout):
            result = await Handshake(sock, exports, default).run()
    except (HandshakeAbort, OSError, TimeoutError, struct.error) as e:
        log.debug("handshake ended peer=%s reason=%s", peer, e or type(e).__name__)
        sock.close()
        return
    except asyncio.CancelledError:
        # evicted by a newer connection, or the daemon is stopping
        sock.close()
        raise
    if result is None:
        sock.close()
        return
    exp, neg = result
    meta_id = META_ID_BASE_ALLOCATION if (
        neg.meta_on and neg.structured and neg.meta_export == exp.name
    ) else 0
    sock.setblocking(True)
    fd = sock.detach()
    try:
        exp.attach(fd, neg.structured, meta_id)
    except OSError as e:
        log.warning("cannot start connection export=%s error=%s", exp.name, e)
