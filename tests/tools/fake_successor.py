"""A misbehaving handoff successor (run by the daemon through GLIDE_HANDOFF_EXEC).

Connects to the predecessor's handoff socket ($GLIDE_HANDOFF_SOCKET) and then
breaks the protocol in the way argv[1] names. The predecessor must abort
cleanly every time: keep serving, leak no descriptor, answer the operator.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from glide.handoff import protocol


def main() -> int:
    mode = sys.argv[1]
    path = os.environ["GLIDE_HANDOFF_SOCKET"]
    if mode == "exit":
        return 3  # dies before connecting
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    hello = b'{"type": "HELLO", "min": 1, "max": 1, "pid": %d, "build": "fake"}' % os.getpid()
    if mode == "garbage":
        sock.send(os.urandom(512))
    elif mode == "truncated":
        sock.send(hello[:20])
    elif mode == "out_of_order":
        sock.send(b'{"type": "READY"}')
    elif mode == "unexpected_fds":
        r, w = os.pipe()
        sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                r.to_bytes(4, "little") + w.to_bytes(4, "little"))])
    elif mode == "bad_version":
        sock.send(b'{"type": "HELLO", "min": 7, "max": 9, "pid": 1, "build": "fake"}')
    elif mode == "stall_after_hello":
        sock.send(hello)
    elif mode == "stall_after_ready":
        ch = protocol.Channel(sock)
        ch.send("HELLO", {"min": 1, "max": 1, "pid": os.getpid(), "build": "fake"})
        ack = ch.recv(10, {"HELLO_ACK"}, max_fds=8)
        for fd in ack.fds:
            os.close(fd)
        ch.send("READY", {})
    else:
        print(f"fake_successor: unknown mode {mode}", file=sys.stderr)
        return 2
    # Hold the connection open without a word: the predecessor must not wait
    # beyond its timeout, and must kill us (a stalled successor).
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
