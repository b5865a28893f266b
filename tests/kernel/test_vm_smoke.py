"""The VM itself: right kernel, drivers loaded, device nodes present, host untouched.

One boot checks everything the other kernel-tier tests take for granted, so that when
they fail, this test says whether the VM or the code under test is at fault.
"""

from __future__ import annotations

import uuid

import vm

SMOKE_SCRIPT = r"""
source tests/kernel/guest.sh
step "kernel"
uname -a
case "$(uname -r)" in 6.12.*) echo "ok: kernel 6.12" ;; *) fail "kernel $(uname -r)" ;; esac

step "drivers"
grep -E '^(ublk_drv|nbd|9p|overlay|ext4) ' /proc/modules
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
ls -l /dev/ublk-control
[ -b /dev/nbd0 ] || fail "/dev/nbd0 missing"
ls -l /dev/nbd0
expect_eq "io_uring_disabled" "$(cat /proc/sys/kernel/io_uring_disabled)" 0

step "loopback"
ip -o link show lo
ip -o addr show lo | grep -q '127.0.0.1' || fail "loopback has no 127.0.0.1"
python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); \
c = socket.create_connection(s.getsockname()); print("ok: tcp over loopback")'

step "the project in the guest"
expect_eq "cwd" "$(pwd)" "REPO"
expect_eq "python" "$(command -v python)" "REPO/.venv/bin/python"
python -c 'import glide, glide._native; print("ok: import glide from", glide.__file__)'
command -v nbd-client fio mkfs.ext4 fsck.ext4

step "writes stay in the guest"
echo guest > PROBE
expect_eq "probe written" "$(cat PROBE)" guest
step "done"
"""


def test_vm_boots_with_drivers_and_the_host_root(run_vm) -> None:
    probe = vm.REPO_ROOT / ".cache" / f"guest-probe-{uuid.uuid4().hex}"
    script = SMOKE_SCRIPT.replace("REPO", str(vm.REPO_ROOT)).replace("PROBE", str(probe))
    result = run_vm(script, timeout=180)
    assert "ok: kernel 6.12" in result.output
    # The guest's root is an overlay with a tmpfs upper layer: nothing reaches the host.
    assert not probe.exists(), "a write inside the VM reached the host's filesystem"
