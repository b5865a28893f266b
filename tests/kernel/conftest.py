"""Kernel tier: tests that need a real kernel driver (nbd, ublk) run inside a VM.

The host kernel has neither driver, so each test boots Debian's 6.12 kernel under QEMU
(vm.py) and runs one bash script in it. Boots cost ~10 s under TCG, so a test batches its
checks into a single script. The tests are part of the default suite; `-m "not kernel"`
leaves them out when iterating on something else.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parent
if str(KERNEL_DIR) not in sys.path:
    sys.path.insert(0, str(KERNEL_DIR))

import systemd_vm  # noqa: E402
import vm  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: runs inside the kernel tier's QEMU VM (tests/kernel/vm.py)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not just this directory's.
    # Every test in this directory boots the VM: mark them all, so no test can forget.
    positions = [i for i, item in enumerate(items) if KERNEL_DIR in Path(item.path).parents]
    for i in positions:
        items[i].add_marker(pytest.mark.kernel)
    # The VM smoke test first among them: when it fails, the other kernel tests' failures
    # are about the VM, not the code under test, and it is the first thing to read.
    ordered = sorted((items[i] for i in positions),
                     key=lambda item: Path(item.path).name != "test_vm_smoke.py")
    for i, item in zip(positions, ordered, strict=True):
        items[i] = item


@pytest.fixture(scope="session")
def vm_assets() -> vm.VmAssets:
    """The cached kernel and initramfs; the first run downloads and builds them."""
    missing = vm.missing_host_tools()
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}; run the README test command, which installs "
            f"{' '.join(vm.HOST_PACKAGES)}"
        )
    t0 = time.monotonic()
    assets = vm.ensure_assets()
    print(f"\nkernel VM assets: {assets.directory} ({time.monotonic() - t0:.1f}s)")
    return assets


@pytest.fixture
def run_vm(vm_assets: vm.VmAssets) -> Callable[..., vm.VmResult]:
    """run_vm(script, timeout) -> VmResult; fails the test with the VM's output unless
    the script exited 0 (pass check=False to inspect a failing result yourself)."""

    def run(script: str, timeout: float = 240.0, check: bool = True) -> vm.VmResult:
        result = vm.run_in_vm(script, timeout=timeout, assets=vm_assets)
        print(f"VM run: {result.duration:.1f}s, returncode={result.returncode}")
        print(result.output)
        if check and result.returncode != 0:
            pytest.fail(result.describe(), pytrace=False)
        return result

    return run


@pytest.fixture
def run_systemd_vm(vm_assets: vm.VmAssets) -> Callable[..., systemd_vm.SystemdRun]:
    """run_systemd_vm(script, timeout, units=..., files=...) -> SystemdRun: the VM with
    systemd as PID 1 (systemd_vm.run_under_systemd). Fails the test with the VM's output
    and journal unless the script exited 0 (check=False to inspect a failure yourself)."""
    why = systemd_vm.missing()
    if why:
        pytest.fail(f"{why}; run the README test command, which installs it")

    def run(script: str, timeout: float = 300.0, check: bool = True,
            **kwargs: object) -> systemd_vm.SystemdRun:
        result = systemd_vm.run_under_systemd(script, timeout, assets=vm_assets, **kwargs)
        print(f"systemd VM run: {result.result.duration:.1f}s, returncode={result.returncode}")
        print(result.result.output)
        if check and result.returncode != 0:
            pytest.fail(result.describe(), pytrace=False)
        return result

    return run
