"""A deliberately low-level NBD client for hostile-input tests.

Polite clients (libnbd, qemu) refuse to send malformed traffic, so this one
speaks the fixed-newstyle protocol byte by byte and lets a test send anything:
bad magic, unknown options and commands, lengths that lie, truncated frames.
Constants follow the NBD protocol specification (doc/proto.md).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

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
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108


REPLY_FLAG_DONE = 1
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_ERROR_OFFSET = (1 << 15) + 2


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes


@dataclass
class Chunk:
    flags: int
    type: int
    handle: int
    payload: bytes

    @property
    def error(self) -> int:
        """errno of an error chunk, 0 otherwise."""
        if self.type & (1 << 15):
            return struct.unpack(">I", self.payload[:4])[0]
        return 0


@dataclass
class SimpleReply:
    error: int
    handle: int
    data: bytes = b""


class RawNBD:
    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.handshake_flags = 0
        self.size = 0
        self.tflags = 0

    @classmethod
    def unix(cls, path: str, timeout: float = 10.0) -> RawNBD:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls(s, timeout)

    @classmethod
    def tcp(cls, port: int, timeout: float = 10.0) -> RawNBD:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s, timeout)

    # --- raw I/O -------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise Closed(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) within timeout.

        Bytes the server sends first (an error reply, say) are read and ignored.
        """
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # --- handshake -----------------------------------------------------------
    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        self.handshake_flags = flags
        return flags

    def send_client_flags(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.send(struct.pack(">I", flags))

    def handshake(self) -> None:
        flags = self.greeting()
        assert flags & FLAG_FIXED_NEWSTYLE, "server is not fixed-newstyle"
        self.send_client_flags(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES))

    def send_option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        n = len(data) if length is None else length
        self.send(struct.pack(">QII", IHAVEOPT, option, n) + data)

    def recv_opt_reply(self) -> OptReply:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        assert length <= 1 << 24, f"absurd option reply length {length}"
        return OptReply(option, rtype, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptReply]:
        """Send an option and collect replies up to the final ACK or error."""
        self.send_option(option, data)
        replies = []
        while True:
            r = self.recv_opt_reply()
            assert r.option == option, f"reply for option {r.option}, sent {option}"
            replies.append(r)
            if r.type == REP_ACK or r.type & REP_ERR:
                return replies

    @staticmethod
    def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        return data + b"".join(struct.pack(">H", i) for i in infos)

    def go(self, name: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> list[OptReply]:
        replies = self.option(OPT_GO, self.go_data(name, infos))
        if replies[-1].type == REP_ACK:
            for r in replies:
                if r.type == REP_INFO and struct.unpack(">H", r.data[:2])[0] == INFO_EXPORT:
                    _, self.size, self.tflags = struct.unpack(">HQH", r.data[:12])
        return replies

    @staticmethod
    def block_size(replies: list[OptReply]) -> tuple[int, int, int] | None:
        for r in replies:
            if r.type == REP_INFO and struct.unpack(">H", r.data[:2])[0] == INFO_BLOCK_SIZE:
                _, mn, pref, mx = struct.unpack(">HIII", r.data[:14])
                return mn, pref, mx
        return None

    def connect_export(self, name: str) -> None:
        self.handshake()
        replies = self.go(name)
        assert replies[-1].type == REP_ACK, f"OPT_GO {name!r} failed: {replies}"

    # --- transmission --------------------------------------------------------
    def send_request(
        self,
        cmd: int,
        offset: int,
        length: int,
        handle: int = 1,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        hdr = struct.pack(
            ">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset & (2**64 - 1), length
        )
        self.send(hdr + payload)

    def recv_simple_reply(self, read_length: int = 0) -> SimpleReply:
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return SimpleReply(error, handle, data)

    def recv_chunk(self) -> Chunk:
        """One structured reply chunk (a simple reply is returned as an error chunk)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            return Chunk(REPLY_FLAG_DONE, CHUNK_ERROR, handle, struct.pack(">IH", error, 0))
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, ctype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
        assert length <= 64 << 20, f"absurd chunk length {length}"
        return Chunk(flags, ctype, handle, self.recv_exact(length))

    def recv_structured(self) -> list[Chunk]:
        """All chunks of one reply, up to the one flagged DONE."""
        chunks = [self.recv_chunk()]
        while not chunks[-1].flags & REPLY_FLAG_DONE:
            chunks.append(self.recv_chunk())
            assert chunks[-1].handle == chunks[0].handle, "chunks of two replies interleaved"
        return chunks

    def read(self, offset: int, length: int, handle: int = 1, flags: int = 0) -> SimpleReply:
        self.send_request(CMD_READ, offset, length, handle, flags)
        return self.recv_simple_reply(length)

    def write(self, offset: int, data: bytes, handle: int = 1, flags: int = 0) -> SimpleReply:
        self.send_request(CMD_WRITE, offset, len(data), handle, flags, data)
        return self.recv_simple_reply()

    def command(
        self, cmd: int, offset: int, length: int, handle: int = 1, flags: int = 0
    ) -> SimpleReply:
        self.send_request(cmd, offset, length, handle, flags)
        return self.recv_simple_reply()

    def disconnect(self) -> None:
        try:
            self.send_request(CMD_DISC, 0, 0, handle=0xD15C)
        except OSError:
            pass
        self.close()
