"""The real daemon against a failing S3 store (issue #3), through a real proxy.

tests/tools/store_proxy.py sits between the daemon's boto3 client and the moto
server and is switched at run time: 503/500 answers, connection resets, hangs,
slow responses, lost replies, flipped bytes in pack GETs. Around it, the test
plays a second writer (a conflicting commit) and damages a pack in the store
itself.

What must hold (issue #3): no acknowledged write is lost and no wrong data is
served; while the store is down the daemon keeps serving and acknowledging
from its cache, retries its flushes with backoff and recovers when the store
does; its memory stays bounded (writers wait on the WAL budget); another
writer's commit fences it; a corrupt block reads as EIO, never as data.

The oracle for "nothing lost": the self-describing blocks of
tests/tools/crash_oracle.py, whose writers log every operation, and a fresh
daemon on an empty data directory that must serve, from the store alone,
exactly the image the first daemon served before it stopped.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import crash_oracle as co
import pytest
from daemon_helpers import (
    AWS_ENV,
    BS,
    BUCKET,
    MiB,
    put,
    read_image,
    reap,
    start_daemon,
    start_writer,
    write_s3_config,
)
from nbdclients import SYSTEM_PYTHON, TOOLS_DIR, system_env
from store_proxy import Message, StoreProxy

from glide.repo.manifest import Manifest
from glide.repo.pack import pack_object_key, read_index
from glide.store import ObjectStore

if TYPE_CHECKING:
    from conftest import Daemon

# Short timeouts and one retry: a fault costs the daemon seconds, not minutes.
STORE_OPTIONS = {"connect_timeout": 1, "read_timeout": 2, "max_attempts": 2}
FLUSH_INTERVAL = "0.2"

# An 8 MiB volume: deterministic gen-1 blocks, the random writer's region,
# blocks written while the store is down.
VOL_BLOCKS = 2048
VOL_SIZE = VOL_BLOCKS * BS
BEFORE = range(0, 256)
WRITER_REGION = range(256, 1280)
DURING = range(1536, 1792)

FAILED_RE = re.compile(r"ts=(\S+)Z .*flush failed volume=vol0 attempt=(\d+) retry_in=([\d.]+)s")


# --- the store, the proxy, the daemons ----------------------------------------------


class Rig:
    """One test's store prefix, proxy and daemons."""

    def __init__(self, factory: Callable[..., Daemon], moto: str, proxy: StoreProxy,
                 direct: ObjectStore, prefix: str, config: Path) -> None:
        self.factory = factory
        self.moto = moto
        self.proxy = proxy
        self.direct = direct  # the test's own client, straight to moto
        self.prefix = prefix
        self.config = config

    def daemon(self, *extra: str, via_proxy: bool = True, size: int = VOL_SIZE) -> Daemon:
        endpoint = self.proxy.url if via_proxy else self.moto
        store = ["--config", str(self.config), "--store", f"s3://{BUCKET}/{self.prefix}",
                 "--s3-endpoint", endpoint]
        return start_daemon(self.factory, size, store, AWS_ENV,
                            "--flush-interval", FLUSH_INTERVAL, *extra)

    def flushed_daemon(self, *extra: str, via_proxy: bool = True, size: int = VOL_SIZE,
                       blocks: range = BEFORE, gen: int = 1) -> Daemon:
        """daemon(), once `blocks`, written with generation `gen`, have been
        flushed to the store."""
        d = self.daemon(*extra, via_proxy=via_proxy, size=size)
        v0 = self.version()
        put(d, blocks, gen)
        wait_for("the first flush", lambda: self.version() > v0, 10, lambda: log_tail(d))
        return d

    def root(self) -> Manifest:
        return Manifest.open(self.direct, "vol0")

    def version(self) -> int:
        return self.root().version


@pytest.fixture
def rig(daemon_factory: Callable[..., Daemon], moto_endpoint: str,
        s3_store_factory: Callable[..., ObjectStore], tmp_short: Path) -> Iterator[Rig]:
    prefix = f"faults-{uuid.uuid4().hex[:12]}"
    config = write_s3_config(tmp_short / "store.toml", **STORE_OPTIONS)
    proxy = StoreProxy(moto_endpoint).start()
    try:
        yield Rig(daemon_factory, moto_endpoint, proxy, s3_store_factory(prefix=prefix),
                  prefix, config)
    finally:
        proxy.stop()


def wait_for(what: str, cond: Callable[[], object], timeout: float,
             on_fail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_fail()}")
        time.sleep(0.05)


def log_tail(d: Daemon) -> str:
    return "daemon log tail:\n" + d.stderr_text()[-4000:]


# --- clients (libnbd under Debian's python3) --------------------------------------------


READ_EACH = r"""
import json, sys, nbd
uri, out, blocks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
errors = {}
with open(out, "wb") as f:
    for b in blocks:
        try:
            f.write(h.pread(4096, b * 4096))
        except nbd.Error as e:
            errors[b] = e.errnum
            f.write(bytes(4096))
h.shutdown()
print(json.dumps(errors))
"""


def read_each(d: Daemon, blocks: list[int], out: Path) -> tuple[dict[int, bytes], dict[int, int]]:
    """One 4 KiB NBD read per block: {block: data} for those that read,
    {block: errno} for those that failed."""
    proc = subprocess.run([SYSTEM_PYTHON, "-c", READ_EACH, d.uri(), str(out), json.dumps(blocks)],
                          capture_output=True, text=True, timeout=60, env=system_env())
    assert proc.returncode == 0, proc.stderr
    errors = {int(k): v for k, v in json.loads(proc.stdout).items()}
    raw = out.read_bytes()
    data = {b: raw[i * BS:(i + 1) * BS] for i, b in enumerate(blocks) if b not in errors}
    return data, errors


def start_region_writer(d: Daemon, log: Path, seed: int) -> subprocess.Popen[str]:
    """The random writer on WRITER_REGION for up to 120 s: run until stop_writer()."""
    return start_writer(d, log, first=WRITER_REGION.start, blocks=len(WRITER_REGION),
                        start_gen=1_000_000, seed=seed, qd=8, duration=120)


def stop_writer(proc: subprocess.Popen[str], log: Path) -> co.Round:
    """Kills the writer (it would run for minutes) and parses its log. Every
    operation it saw complete must have succeeded: the store being down is no
    reason to fail a write or a FLUSH."""
    assert proc.poll() is None, f"the writer stopped early: {proc.communicate()}"
    proc.kill()
    proc.wait()
    text = log.read_text()
    lines = text.splitlines()[: text.count("\n")]  # a torn last line is dropped
    bad = [ln for ln in lines if ln.startswith(("E ", "FE ", "X "))]
    assert not bad, f"{len(bad)} operations failed, first: {bad[:5]}"
    rnd = co.parse_log(lines)
    assert rnd.acked > 200 and rnd.flushes > 10, (rnd.ops, rnd.acked, rnd.flushes)
    return rnd


def allowed_values(rnd: co.Round | None, fixed: dict[int, int]) -> dict[int, set[int]]:
    """block -> the values (generation or co.ZERO) the volume may hold with no
    crash anywhere: the newest acknowledged operation's value, or that of an
    operation issued after it (in flight when the writer was killed). Blocks
    in `fixed` hold that generation, the others zeros."""
    allowed = {b: {v} for b, v in fixed.items()}
    for b, ops in (rnd.per_block if rnd else {}).items():
        acked = [i for i, op in enumerate(ops) if op.acked]
        first = acked[-1] if acked else 0
        allowed[b] = {op.value for op in ops[first:]} | (set() if acked else {co.ZERO})
    return allowed


def check_image(image: bytes, allowed: dict[int, set[int]], what: str) -> None:
    bad = []
    for b in range(len(image) // BS):
        found = co.classify(image[b * BS:(b + 1) * BS])
        ok_values = allowed.get(b, {co.ZERO})
        if found.kind == "zero":
            ok = co.ZERO in ok_values
        else:
            ok = found.kind == "value" and found.block == b and found.gen in ok_values
        if not ok:
            shown = sorted("zeros" if v == co.ZERO else f"gen {v}" for v in ok_values)
            bad.append(f"block {b}: holds {found.describe()}, allowed {shown[:6]}")
    assert not bad, f"{what}: {len(bad)} wrong blocks, first:\n" + "\n".join(bad[:10])


def flush_failures(d: Daemon) -> list[tuple[float, int, float]]:
    """(time, attempt, retry_in) of every `flush failed` line."""
    out = []
    for m in FAILED_RE.finditer(d.stderr_text()):
        t = datetime.fromisoformat(m.group(1)).timestamp()
        out.append((t, int(m.group(2)), float(m.group(3))))
    return out


def check_backoff(d: Daemon) -> None:
    """Failed flushes are retried with exponential backoff: attempt n waits
    min(30, 0.5 * 2^(n-1)) s (capped at 2 s while the WAL is under pressure),
    and the next failure comes no sooner."""
    fails = flush_failures(d)
    assert fails, "no `flush failed` line in the daemon log\n" + log_tail(d)
    run: list[tuple[float, int, float]] = []
    for f in fails:  # the attempt numbers restart after each recovery
        if f[1] == 1:
            run = []
        run.append(f)
        assert f[1] == len(run), f"attempt numbers out of order: {fails}"
        assert f[2] in (pytest.approx(min(30.0, 0.5 * 2 ** (f[1] - 1))),
                        pytest.approx(min(2.0, 0.5 * 2 ** (f[1] - 1)))), fails
        if len(run) > 1:
            gap = f[0] - run[-2][0]
            assert gap >= run[-2][2] - 0.01, f"retried {gap:.3f}s later, within backoff: {fails}"


def stop_cleanly(d: Daemon) -> None:
    """SIGTERM: the daemon drains and makes its final flush to the store."""
    assert d.stop() == 0, log_tail(d)
    text = d.stderr_text()
    text = text[text.rfind("received SIGTERM"):]  # this run's shutdown only
    assert "final flush failed" not in text, log_tail(d)
    assert "stopped cleanly" in text, log_tail(d)


def check_store_copy(rig: Rig, a: Daemon, allowed: dict[int, set[int]], what: str,
                     tmp: Path) -> None:
    """`a` serves only `allowed` values; it stops cleanly, and a daemon on an
    empty data directory, straight on the store, then serves the same image."""
    image_a = read_image(a, tmp / "a.img", VOL_BLOCKS)
    check_image(image_a, allowed, what)
    stop_cleanly(a)
    b = rig.daemon(via_proxy=False)
    image_b = read_image(b, tmp / "b.img", VOL_BLOCKS)
    assert image_b == image_a, "the store's copy differs from what the daemon served"
    stop_cleanly(b)


TARGET = 100  # the block whose stored copy gets damaged


def write_and_drain(rig: Rig) -> None:
    """BEFORE holds gen 1 in the store, and no daemon runs."""
    a = rig.daemon(via_proxy=False)
    put(a, BEFORE, gen=1)
    stop_cleanly(a)
    assert rig.root().lookup(TARGET) is not None


def check_blocks(got: dict[int, bytes], gen: int) -> None:
    wrong = {b: co.classify(d).describe() for b, d in got.items()
             if co.classify(d) != co.Found("value", b, gen)}
    assert not wrong, f"blocks with wrong data: {wrong}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- store outages --------------------------------------------------------------


def pack_put(req: Message) -> bool:
    return req.method == "PUT" and "/packs/" in req.path


FAULTS = {
    # mode, proxy options, failed flushes to see before the store comes back.
    # The outage starts at the first pack upload of a flush (so the attempt
    # fails in its upload, not in the manifest commit's own retry loop) and
    # lasts until the daemon has logged that many failed flushes.
    "error503": ("error", {"status": 503}, 2),
    "error500": ("error", {"status": 500}, 2),
    "reset": ("reset", {}, 2),
    # a hang costs the client its read timeout (2 s) twice per request
    "hang": ("hang", {}, 1),
    # slower than usual but within the read timeout: flushes must go on
    # landing, just later; the "outage" lasts 2.5 s
    "slow": ("slow", {"delay": 0.3}, 0),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_store_outage_loses_nothing(rig: Rig, tmp_short: Path, fault: str) -> None:
    """The store fails (or crawls) while a writer runs: writes and FLUSHes go
    on being acknowledged and cached data served, flushes fail with backoff
    and recover, and in the end the store holds exactly what the daemon
    served."""
    mode, options, failures = FAULTS[fault]
    a = rig.flushed_daemon()

    wlog = tmp_short / "writer.log"
    writer = start_region_writer(a, wlog, seed=list(FAULTS).index(fault))
    try:
        time.sleep(0.5)  # some of the writer's data reaches the store first
        rig.proxy.set_mode(mode, **options, start_on=None if mode == "slow" else pack_put)
        assert rig.proxy.active.wait(10), "no flush started"
        t_fault = time.monotonic()
        v_fault = rig.version()

        # While the store is down: writes are acknowledged (FLUSH included),
        # and what the cache holds is served, old and new.
        put(a, DURING, gen=2)
        data, errors = read_each(a, [*BEFORE[::17], *DURING[::17]], tmp_short / "during.img")
        assert not errors, f"reads failed during the outage: {errors}"
        for b, block in data.items():
            want = 1 if b in BEFORE else 2
            assert co.classify(block) == co.Found("value", b, want), f"block {b} during outage"

        if mode == "slow":
            time.sleep(max(0.0, t_fault + 2.5 - time.monotonic()))
        else:
            wait_for(f"{failures} failed flushes", lambda: len(flush_failures(a)) >= failures,
                     20, lambda: log_tail(a))
        assert rig.proxy.faults[mode] > 0, (rig.proxy.requests, rig.proxy.faults)
        assert a.alive(), log_tail(a)
        v_end = rig.version()
        if mode == "slow":
            assert v_end > v_fault, "no flush landed while the store was merely slow"
            assert not flush_failures(a), log_tail(a)
        else:
            assert v_end == v_fault, "a commit went through a store that fails every request"
            check_backoff(a)
        rig.proxy.set_mode("pass")
        if mode != "slow":
            wait_for("`flush recovered`", lambda: "flush recovered" in a.stderr_text(), 20,
                     lambda: log_tail(a))
        wait_for("a commit after the outage", lambda: rig.version() > v_end, 20,
                 lambda: log_tail(a))
        time.sleep(0.3)  # the writer goes on a little with the store back
        rnd = stop_writer(writer, wlog)
    finally:
        reap(writer)
    if mode != "slow":
        check_backoff(a)  # the whole log, recovery included
    print(f"{fault}: writer ops={rnd.ops} acked={rnd.acked} flushes={rnd.flushes}; proxy "
          f"requests={dict(rig.proxy.requests)} faults={dict(rig.proxy.faults)}; "
          f"failed flushes={[(n, r) for _, n, r in flush_failures(a)]}; versions "
          f"{v_fault}->{v_end}->{rig.version()}")

    allowed = allowed_values(rnd, {**dict.fromkeys(BEFORE, 1), **dict.fromkeys(DURING, 2)})
    image_a = read_image(a, tmp_short / "a.img", VOL_BLOCKS)
    check_image(image_a, allowed, "the daemon's own image after the outage")
    stop_cleanly(a)
    owner = rig.root().root.writer
    assert owner.startswith("glidefs/"), owner

    # A fresh daemon, empty data directory, straight to the store: it must
    # serve exactly what the first one served, from the store alone.
    b = rig.daemon(via_proxy=False)
    assert "cold open" in b.stderr_text(), log_tail(b)
    image_b = read_image(b, tmp_short / "b.img", VOL_BLOCKS)
    check_image(image_b, allowed, "a cold daemon's image from the store")
    assert image_b == image_a, "the store's copy differs from what the daemon served"
    stop_cleanly(b)


# How long a read miss may wait for a failing store before its EIO: the
# fetcher tries 3 times (glide/volume/fetcher.py), each a GET that the client tries
# twice; a 503 is answered at once, a hang costs the 2 s read timeout.
MISS_BOUND = {"error503": 8.0, "hang": 3 * (2 * 2.0 + 1.5) + 1.0}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", list(MISS_BOUND))
def test_cold_daemon_during_an_outage(rig: Rig, tmp_short: Path, fault: str) -> None:
    """A daemon that holds only part of the volume when the store goes away:
    what it holds is served, a read of anything else fails with EIO within
    bounded time (never hangs, never returns zeros), and the same read works
    once the store is back."""
    mode, options = FAULTS[fault][:2]
    write_and_drain(rig)
    b = rig.daemon()  # cold, through the proxy
    cached = list(BEFORE[:128])
    got, errors = read_each(b, cached, tmp_short / "warm.img")
    assert not errors
    check_blocks(got, 1)

    rig.proxy.set_mode(mode, **options)
    got, errors = read_each(b, cached[::5], tmp_short / "cached.img")
    assert not errors, f"cached blocks failed while the store is down: {errors}"
    check_blocks(got, 1)
    t0 = time.monotonic()
    _, errors = read_each(b, [200], tmp_short / "miss.img")
    took = time.monotonic() - t0
    assert errors == {200: errno.EIO}, errors
    assert took < MISS_BOUND[fault], f"a read miss waited {took:.1f}s for a failing store"
    assert rig.proxy.faults[mode] > 0
    assert re.search(r"store unavailable pack=\w+ blocks=1 ", b.stderr_text()), log_tail(b)

    rig.proxy.set_mode("pass")
    got, errors = read_each(b, [200, *BEFORE[128:]], tmp_short / "rest.img")
    assert not errors, f"reads still fail after the store came back: {errors}"
    check_blocks(got, 1)
    stop_cleanly(b)


@pytest.mark.timeout(90)
def test_stop_while_the_store_is_down(rig: Rig, tmp_short: Path) -> None:
    """SIGTERM while the store fails: the daemon still stops, its final flush
    fails and leaves everything in the WAL, and the next start (store back)
    flushes it: nothing acknowledged is lost across the restart."""
    a = rig.flushed_daemon()
    wlog = tmp_short / "writer.log"
    writer = start_region_writer(a, wlog, seed=5)
    try:
        time.sleep(0.3)
        rig.proxy.set_mode("error", status=503, start_on=pack_put)
        assert rig.proxy.active.wait(10), "no flush started"
        v_down = rig.version()
        put(a, DURING, gen=2)
        time.sleep(0.5)
        rnd = stop_writer(writer, wlog)
    finally:
        reap(writer)
    t0 = time.monotonic()
    a.stop(timeout=30)
    took = time.monotonic() - t0
    shutdown = a.stderr_text()[a.stderr_text().rfind("received SIGTERM"):]
    assert re.search(r"final flush failed volume=vol0 .* [1-9]\d* blocks stay in the WAL",
                     shutdown), log_tail(a)
    assert took < 20, f"stopping took {took:.1f}s"
    assert rig.version() == v_down

    rig.proxy.set_mode("pass")
    a.start()
    assert "warm open" in a.stderr_text()[a.stderr_text().rfind("opened volume"):], log_tail(a)
    wait_for("the restarted daemon's flush", lambda: rig.version() > v_down, 15,
             lambda: log_tail(a))
    allowed = allowed_values(rnd, {**dict.fromkeys(BEFORE, 1), **dict.fromkeys(DURING, 2)})
    check_store_copy(rig, a, allowed, "the restarted daemon's image", tmp_short)


@pytest.mark.timeout(60)
def test_lost_replies_on_the_root_commit(rig: Rig, tmp_short: Path) -> None:
    """The root PUT of three commits reaches the store, but the reply is
    reset away: the daemon must learn that its own commit landed (not take
    it for another writer's and fence itself), and nothing is lost."""
    a = rig.flushed_daemon()
    wlog = tmp_short / "writer.log"
    writer = start_region_writer(a, wlog, seed=3)
    try:
        time.sleep(0.3)
        v_before = rig.version()
        rig.proxy.set_mode("drop", times=3, only=lambda req: req.method == "PUT"
                           and req.path.endswith("/volumes/vol0/root"))
        wait_for("3 lost replies", lambda: rig.proxy.faults["drop"] >= 3, 15, lambda: log_tail(a))
        v_lost = rig.version()
        wait_for("a commit after them", lambda: rig.version() > v_lost, 10, lambda: log_tail(a))
        rnd = stop_writer(writer, wlog)
    finally:
        reap(writer)
    assert v_lost >= v_before + 3, "the dropped root PUTs did not land"
    log = a.stderr_text()
    assert "another writer owns" not in log, "the daemon fenced itself on its own commit"
    assert rig.root().root.writer.startswith("glidefs/")
    allowed = allowed_values(rnd, dict.fromkeys(BEFORE, 1))
    check_store_copy(rig, a, allowed, "the daemon's image", tmp_short)
    print(f"lost replies: {len(flush_failures(a))} failed flushes; versions {v_before} -> "
          f"{v_lost}")


# --- a conflicting commit ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_conflicting_commit_fences_the_daemon(rig: Rig, tmp_short: Path) -> None:
    """Another writer takes the volume over while the daemon runs: the
    daemon's next commit is refused (Fenced), it says so once, never writes
    the root again, keeps every acknowledged write in its WAL and serves it,
    and from then on refuses writes (EPERM over NBD) instead of letting them
    wait forever on a WAL nothing will drain."""
    a = rig.flushed_daemon(via_proxy=False)
    wlog = tmp_short / "writer.log"
    writer = start_region_writer(a, wlog, seed=11)
    try:
        time.sleep(0.5)
        intruder = rig.root()
        intruder.take_ownership("test-intruder")
        taken = intruder.root
        wait_for("the fence", lambda: "another writer owns this volume" in a.stderr_text(), 10,
                 lambda: log_tail(a))
        time.sleep(1.0)  # several flush intervals, the writer going on (and failing)
    finally:
        reap(writer)
    assert rig.root().root == taken, "the fenced daemon changed the intruder's root"
    log = a.stderr_text()
    assert log.count("another writer owns this volume") == 1, log_tail(a)
    assert "flush failed" not in log, "a fence is not a transient failure to retry"
    refused = put(a, DURING, gen=3, check=False)
    assert refused.returncode != 0, "a fenced volume accepted a write"
    assert "Operation not permitted" in refused.stderr or "EPERM" in refused.stderr, \
        refused.stderr[-2000:]

    text = wlog.read_text()
    lines = text.splitlines()[: text.count("\n")]
    rnd = co.parse_log(lines)
    assert rnd.acked > 50, rnd.acked
    assert any(ln.startswith("E ") for ln in lines), "the writer never saw the refusal"
    allowed = allowed_values(rnd, dict.fromkeys(BEFORE, 1))
    check_image(read_image(a, tmp_short / "a.img", VOL_BLOCKS), allowed,
                "the fenced daemon's image")

    # Stopping makes no final flush over the intruder's root; the writes stay
    # in the WAL, and this cache now refuses to open rather than drop them or
    # overwrite the store.
    assert a.stop() == 0, log_tail(a)
    assert re.search(r"volume=vol0 is fenced; [1-9]\d* unflushed blocks stay in its WAL",
                     a.stderr_text()), log_tail(a)
    assert rig.root().root == taken
    with pytest.raises(AssertionError, match="did not come from this cache"):
        a.start()
    assert rig.root().root == taken


# --- corrupt packs ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_corrupt_pack_byte_in_the_store(rig: Rig, tmp_short: Path) -> None:
    """One flipped byte in a stored pack's payload: a cold daemon answers a
    read of that block with EIO (every time: bad bytes are never installed),
    serves its neighbours in the same pack, names the pack and entry in its
    log, and stays up."""
    write_and_drain(rig)
    loc = rig.root().lookup(TARGET)
    assert loc is not None
    entry = read_index(rig.direct, loc.pack_key, loc.index_offset, loc.index_length).entry(
        loc.entry)
    key = pack_object_key(loc.pack_key)
    pack = bytearray(rig.direct.get(key))
    pack[entry.offset + entry.length // 2] ^= 0x01
    rig.direct.put(key, bytes(pack))

    b = rig.daemon(via_proxy=False)
    got, errors = read_each(b, list(BEFORE), tmp_short / "b.img")
    assert errors == {TARGET: errno.EIO}, errors
    check_blocks(got, 1)
    assert len(got) == len(BEFORE) - 1
    assert re.search(rf"corrupt block in the store volume=vol0 lba={TARGET} "
                     rf"pack={loc.pack_key} entry={loc.entry}\b", b.stderr_text()), log_tail(b)
    _, errors = read_each(b, [TARGET], tmp_short / "again.img")
    assert errors == {TARGET: errno.EIO}, "a corrupt block was installed on the second read"
    assert b.alive()
    # Overwriting the block repairs it (a write needs nothing from the store).
    put(b, range(TARGET, TARGET + 1), gen=5)
    got, errors = read_each(b, [TARGET], tmp_short / "fixed.img")
    assert not errors
    check_blocks(got, 5)
    stop_cleanly(b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("part", ["payload", "index"])
def test_corrupted_in_transit_is_never_served(rig: Rig, tmp_short: Path, part: str) -> None:
    """The proxy flips a byte in pack GETs (the block's payload, or the pack's
    index) for a cold daemon: the read gets EIO, never the damaged data, and
    once the store answers correctly the same block reads back right."""
    write_and_drain(rig)
    loc = rig.root().lookup(TARGET)
    assert loc is not None
    index_range = f"bytes={loc.index_offset}-{loc.index_offset + loc.index_length - 1}"

    def is_index(req: Message) -> bool:
        return req.header("Range") == index_range

    b = rig.daemon()  # through the proxy, which passes for now
    rig.proxy.set_mode("corrupt", only=is_index if part == "index" else
                       lambda req: not is_index(req))
    _, errors = read_each(b, [TARGET], tmp_short / "bad.img")
    assert errors == {TARGET: errno.EIO}, errors
    assert rig.proxy.faults["corrupt"] >= 1, rig.proxy.log[-10:]
    pattern = (rf"corrupt block in the store volume=vol0 lba={TARGET} pack={loc.pack_key} "
               rf"entry={loc.entry}\b" if part == "payload"
               else rf"cannot fetch volume=vol0 pack={loc.pack_key} ")
    assert re.search(pattern, b.stderr_text()), log_tail(b)
    assert b.alive()

    rig.proxy.set_mode("pass")
    got, errors = read_each(b, list(BEFORE), tmp_short / "good.img")
    assert not errors, errors
    check_blocks(got, 1)
    stop_cleanly(b)


# --- memory while the store is down ------------------------------------------------------


MEM_WRITER = r"""
import sys, nbd
sys.path.insert(0, sys.argv[1])
from crash_oracle import BLOCK, make_block
uri, first, count, passes, progress = sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
h = nbd.NBD()
h.connect_uri(uri)
done = 0
with open(progress, "w", buffering=1) as log:
    for gen in range(1, passes + 1):
        for b in range(first, first + count, 256):
            n = min(256, first + count - b)
            h.pwrite(b"".join(make_block(x, gen) for x in range(b, b + n)), b * BLOCK)
            done += n * BLOCK
            log.write(f"{done}\n")
    h.flush()
    log.write("done\n")
h.shutdown()
"""
WAL_BUDGET = 70 * MiB
MEM_REGION = range(0, 12800)  # 50 MiB, written 4 times: 200 MiB
MEM_PASSES = 4
MEM_VOL_BLOCKS = 16384  # 64 MiB
WARM = range(13000, 13064)
# What a flush attempt may hold while the store is down: the dirty data is at
# most the WAL budget (70 MiB; here at most the 50 MiB region), built into
# packs of 16 MiB, at most upload_workers + 1 = 5 of them waiting
# (glide/volume/flusher.py), plus a copy of each of the 4 in upload (S3Store.put):
# about 70 + 64 MiB. 160 MiB above the start leaves room for allocator slack
# and is still less than the 200 MiB written, so a daemon that kept writes in
# memory could not pass. (Measured: about 100 MiB.)
RSS_BOUND_DOWN = 160 * MiB
# Once the store is back, uploads really are in flight (and the writer pushes
# more dirty data behind them): the bound of the "bounded" at large.
# (Measured: up to about 150 MiB.)
RSS_BOUND = 300 * MiB


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []  # (wall-clock time, bytes)
        self.done = threading.Event()

    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append((time.time(), rss_kib(self.pid) * 1024))
            except (OSError, AssertionError):
                return
            time.sleep(0.05)


def progress(path: Path) -> tuple[int, bool]:
    """(bytes acknowledged so far, finished)"""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    done = bool(lines) and lines[-1] == "done"
    numbers = [int(x) for x in lines if x.isdigit()]
    return (numbers[-1] if numbers else 0), done


@pytest.mark.timeout(120)
def test_memory_bounded_while_the_store_is_down(rig: Rig, tmp_short: Path) -> None:
    a = rig.flushed_daemon("--wal-budget", "70M", "--wal-segment-size", "33M",
                           size=MEM_VOL_BLOCKS * BS, blocks=WARM, gen=9)
    rss0 = rss_kib(a.pid) * 1024
    sampler = RssSampler(a.pid)
    sampler.start()

    rig.proxy.set_mode("error", status=503)
    prog = tmp_short / "progress"
    total = len(MEM_REGION) * BS * MEM_PASSES
    writer = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", MEM_WRITER, str(TOOLS_DIR), a.uri(), str(MEM_REGION.start),
         str(len(MEM_REGION)), str(MEM_PASSES), str(prog)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=system_env())
    try:
        # The writer runs into the WAL budget and waits there (no error).
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() - since < 2.0:
            assert time.monotonic() < deadline, f"the writer never stalled: {progress(prog)}"
            assert writer.poll() is None, f"the writer ended: {writer.communicate()}"
            now = progress(prog)[0]
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.1)
        stalled = last
        assert 32 * MiB <= stalled <= WAL_BUDGET, f"stalled after {stalled / MiB:.1f} MiB"
        # A few more flush attempts (each builds packs, then fails) while the
        # writer waits: none of them may cost memory that is not given back.
        wait_for("3 failed flushes", lambda: len(flush_failures(a)) >= 3, 15, lambda: log_tail(a))
        check_backoff(a)
        # Reads are not held back by the writers' wait.
        got, errors = read_each(a, list(WARM[::7]), tmp_short / "warm.img")
        assert not errors
        check_blocks(got, 9)
        fails = flush_failures(a)
        rss_down = sampler.peak()

        rig.proxy.set_mode("pass")
        _, err = writer.communicate(timeout=90)
        assert writer.returncode == 0, err
        assert progress(prog) == (total, True)
    finally:
        reap(writer)
        sampler.done.set()
        sampler.join()
    peak = sampler.peak()
    print(f"memory: rss at start {rss0 / MiB:.0f} MiB, peak while down "
          f"{rss_down / MiB:.0f} MiB, peak overall {peak / MiB:.0f} MiB; writer stalled after "
          f"{stalled / MiB:.1f} MiB; {len(fails)} failed flushes while down")
    assert rss_down - rss0 < RSS_BOUND_DOWN, f"{(rss_down - rss0) / MiB:.0f} MiB while down"
    assert peak - rss0 < RSS_BOUND, f"{(peak - rss0) / MiB:.0f} MiB after recovery"

    allowed = {b: {MEM_PASSES} for b in MEM_REGION} | {b: {9} for b in WARM}
    check_image(read_image(a, tmp_short / "a.img", MEM_VOL_BLOCKS), allowed,
                "after the store came back")
    stop_cleanly(a)
