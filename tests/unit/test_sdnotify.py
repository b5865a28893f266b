"""sd_notify: the datagram systemd receives, and silence outside systemd."""

from __future__ import annotations

import socket

from glide.daemon.sdnotify import SystemdNotifier


def test_sends_key_value_lines_to_the_notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        n = SystemdNotifier(path)
        assert n.enabled
        assert n.send(READY=1, STATUS="serving 2 volume(s)")
        assert srv.recv(4096) == b"READY=1\nSTATUS=serving 2 volume(s)"


def test_abstract_socket_address():
    name = f"glidefs-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        assert SystemdNotifier("@" + name).status("stopping")
        assert srv.recv(4096) == b"STATUS=stopping"


def test_without_systemd_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled and not n.send(READY=1)


def test_a_dead_socket_is_not_fatal(tmp_path):
    n = SystemdNotifier(str(tmp_path / "nobody-listens"))
    assert n.send(READY=1) is False
    assert n.send(STOPPING=1) is False  # warned once, still harmless
