"""Plain helpers shared by the tests that run real daemons on an object store
(test_daemon_store.py and test_daemon_faults.py); fixtures are in conftest.py,
which also puts tests/tools on sys.path for the imports below.

- The moto S3 bucket as a daemon sees it: the environment (fake credentials,
  no real AWS configuration read) and a config file naming the bucket.
- Starting a daemon that serves one volume, vol0, on a store.
- The crash oracle's libnbd client, tests/tools/crash_writer.py (run under
  Debian's python3), against a daemon: synchronous writes of one generation,
  reading an image back, and the random writer that logs every operation.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import crash_oracle as co
from nbdclients import SYSTEM_PYTHON, TOOLS_DIR, system_env

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
BS = co.BLOCK
BUCKET = "glide-store-tests"  # created by conftest.py's moto_endpoint fixture
REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "glide-test", "AWS_SECRET_ACCESS_KEY": "glide-test",
    "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
    # never read a real AWS configuration on the machine
    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
WRITER = str(TOOLS_DIR / "crash_writer.py")


# --- daemons on a store -------------------------------------------------------------


def write_s3_config(path: Path, **fields: str | int) -> Path:
    """Writes a config file whose [store] is the moto bucket, path-style, with
    `fields` (prefix, endpoint_url, timeouts, ...) added; returns `path`."""
    table = {"kind": "s3", "bucket": BUCKET, "region": REGION, "addressing_style": "path",
             **fields}
    path.write_text("[store]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return path


def start_daemon(factory: Callable[..., Daemon], size: int, store_args: list[str],
                 env: dict[str, str], *extra: str, data_dir: Path | None = None) -> Daemon:
    """A running daemon (conftest.py's daemon_factory) serving vol0 of `size`
    bytes on the store that `store_args` and `env` name, with `extra` flags."""
    return factory(volumes=[("vol0", size)], extra_args=[*store_args, *extra], env=env,
                   data_dir=data_dir)


# --- crash_writer.py against a daemon --------------------------------------------------


def crash_tool(*args: str, timeout: float = 60.0,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs crash_writer.py with `args`; with `check`, it must succeed."""
    proc = subprocess.run([SYSTEM_PYTHON, WRITER, *args], capture_output=True, text=True,
                          timeout=timeout, env=system_env())
    if check:
        assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def put(d: Daemon, blocks: range, gen: int,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Writes blocks with generation `gen`, then FLUSH: acknowledged and durable."""
    return crash_tool("put", "--uri", d.uri(), "--first", str(blocks.start),
                      "--blocks", str(len(blocks)), "--gen", str(gen), "--flush", check=check)


def read_image(d: Daemon, out: Path, blocks: int, flush: bool = False) -> bytes:
    """The first `blocks` blocks of vol0 (through `out`); with `flush`, a FLUSH
    after the read makes what was read durable."""
    crash_tool("read", "--uri", d.uri(), "--out", str(out), "--first", "0",
               "--blocks", str(blocks), *(["--flush"] if flush else []))
    return out.read_bytes()


def start_writer(d: Daemon, log: Path, *, first: int, blocks: int, start_gen: int, seed: int,
                 qd: int, duration: float, flush_every: int = 16, fua_prob: float = 0.05,
                 zero_prob: float = 0.05) -> subprocess.Popen[str]:
    """crash_writer.py's random writer (writes, trims, zeroes, FUA, FLUSHes) on
    blocks [first, first + blocks), every operation logged to `log`, for up
    to `duration` seconds; returns once it is connected. reap() it."""
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, WRITER, "write", "--uri", d.uri(), "--log", str(log),
         "--first", str(first), "--blocks", str(blocks), "--start-gen", str(start_gen),
         "--seed", str(seed), "--qd", str(qd), "--flush-every", str(flush_every),
         "--fua-prob", str(fua_prob), "--zero-prob", str(zero_prob),
         "--duration", str(duration)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=system_env())
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.strip() == "started", f"writer did not start: {line!r} {proc.stderr.read()}"
    return proc


def reap(proc: subprocess.Popen[str]) -> None:
    """Kills `proc` if it still runs, and waits for it (for `finally:`)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
