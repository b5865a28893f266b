"""systemd's notify protocol (sd_notify(3)), written out in a few lines.

The protocol is a datagram of newline-separated KEY=VALUE lines to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' means the abstract
namespace). It is stable and documented, so no binding is needed.

Keeps:
  - nothing is sent when $NOTIFY_SOCKET is unset (not under systemd), and a
    failed send is logged once, never fatal: supervision is advisory, the
    daemon's own duties come first;
  - READY=1 is sent only by the daemon once every volume is bound and every
    listener is up (glide/daemon/main.py), STOPPING=1 before the clean stop.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("glide.daemon")


class SystemdNotifier:
    """Sends notify messages to the service manager, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr or None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """notify(READY=1, STATUS="...") → True if the datagram was sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, self.address)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), e)
                self._warned = True
            return False

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)
