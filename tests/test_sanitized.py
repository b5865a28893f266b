"""The C core under AddressSanitizer and UndefinedBehaviorSanitizer.

Builds the extension with GLIDE_SANITIZE=1 into build/asan and runs, in
subprocesses: the volume unit tests in-process with the sanitizer runtimes
preloaded, and daemon-level tests (fio verify, hostile clients) with only the
daemon preloaded. Any sanitizer report fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "asan"


@pytest.fixture(scope="module")
def asan_build() -> Path:
    env = dict(os.environ, GLIDE_SANITIZE="1")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(BUILD),
         "--build-temp", str(ROOT / "build" / "asan-tmp")],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )
    # the Python sources (glide.export too: test_nbd_detach does the handshake),
    # never the in-place, unsanitized extension
    shutil.copytree(ROOT / "glide", BUILD / "glide", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return BUILD


def runtime_libs() -> str:
    return ":".join(
        subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                       check=True).stdout.strip()
        for lib in ("libasan.so", "libubsan.so")
    )


def run_pytest(args: list[str], env: dict[str, str], tmp_path: Path) -> None:
    # cwd outside the repo so `import glide` finds the sanitized build first
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    out = r.stdout[-6000:] + r.stderr[-6000:]
    assert r.returncode == 0, out
    assert "AddressSanitizer" not in out and "runtime error:" not in out, out


def test_volume_units_under_sanitizers(asan_build: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(asan_build), LD_PRELOAD=runtime_libs(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    probe = subprocess.run(
        [sys.executable, "-c", "import glide._native as n; print(n.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )
    assert str(asan_build) in probe.stdout
    run_pytest([str(ROOT / "tests" / "unit" / "test_volume.py"),
                str(ROOT / "tests" / "unit" / "test_readthrough.py"),
                str(ROOT / "tests" / "unit" / "test_eviction.py"),
                str(ROOT / "tests" / "unit" / "test_grow.py"),
                str(ROOT / "tests" / "unit" / "test_metrics.py"),
                str(ROOT / "tests" / "unit" / "test_nbd_detach.py"),
                str(ROOT / "tests" / "unit" / "test_codecs.py")], env, tmp_path)


def test_daemon_under_sanitizers(asan_build: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(asan_build), GLIDE_DAEMON_SANITIZED="1")
    run_pytest([str(ROOT / "tests" / "integration" / "test_hostile.py")], env, tmp_path)
    run_pytest([str(ROOT / "tests" / "integration" / "test_clients.py"), "-k", "fio or qemu"],
               env, tmp_path)
