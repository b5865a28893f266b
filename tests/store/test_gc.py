"""GC's own safety rules, on real stores: the grace period against the commit
deadline (in collect_garbage and through the real CLI), the bound on a run,
last-modified resolution, and an identical re-upload racing a deletion.

GC under real daemons and flushes is in test_daemon_store.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from glide.cli.main import main
from glide.repo import gc as gc_module
from glide.repo.gc import GcStopped, GraceTooShort, collect_garbage
from glide.store import LocalDirStore, NotFound, ObjectInfo, ObjectStore
from glide.store.base import ForwardingStore


def _pack_key(n: int) -> str:
    return f"packs/{n:032x}"


def _age(store: LocalDirStore, key: str, seconds: float) -> None:
    """Makes `key` look written `seconds` ago (only a local store can)."""
    t = time.time() - seconds
    os.utime(store._path(store.full_key(key)), (t, t))


def _exists(store: ObjectStore, key: str) -> bool:
    try:
        store.head(key)
        return True
    except NotFound:
        return False


@pytest.fixture
def local(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store")


def _glidefs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "glide", *args], capture_output=True,
                          text=True, timeout=60)


# --- grace against the commit deadline --------------------------------------------


def test_cli_refuses_a_grace_within_twice_the_commit_deadline(local: LocalDirStore,
                                                             tmp_path: Path) -> None:
    local.put(_pack_key(1), b"garbage")
    _age(local, _pack_key(1), 3600)
    where = ["--store", str(local.root)]

    r = _glidefs("gc", *where, "--grace", "1s")  # against the default deadline, 10 min
    assert r.returncode == 2, r.stderr
    for needed in ("1s", "600s", "1200s", "--grace", "--commit-deadline"):
        assert needed in r.stderr, (needed, r.stderr)

    # The daemons' config file says how long their deadline is.
    config = tmp_path / "glidefs.toml"
    config.write_text(f'[store]\npath = "{local.root}"\ncommit_deadline = "1m"\n')
    r = _glidefs("gc", "--config", str(config), "--grace", "2m")
    assert r.returncode == 2 and "60s" in r.stderr and "120s" in r.stderr, r.stderr
    assert _exists(local, _pack_key(1))  # refused before touching the store

    r = _glidefs("gc", "--config", str(config), "--grace", "121s", "--dry-run")
    assert r.returncode == 0 and "would delete 1 " in r.stdout, r.stdout + r.stderr
    r = _glidefs("gc", *where, "--grace", "1s", "--commit-deadline", "100ms")
    assert r.returncode == 0 and "deleted 1 " in r.stdout, r.stdout + r.stderr
    assert not _exists(local, _pack_key(1))

    r = _glidefs("gc", *where, "--commit-deadline", "0s")
    assert r.returncode == 2 and "--commit-deadline" in r.stderr, r.stderr


class _Untouchable(ForwardingStore):
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        raise AssertionError("GC read the store although it had to refuse")


def test_collect_garbage_refuses_direct_callers_too(local: LocalDirStore) -> None:
    store = _Untouchable(local)
    with pytest.raises(GraceTooShort, match="1200s"):
        collect_garbage(store, grace=1200)  # not more than twice the default 600 s
    with pytest.raises(GraceTooShort, match="must exceed 2s"):
        collect_garbage(store, grace=1.5, commit_deadline=1.0, dry_run=True)


# --- ages -----------------------------------------------------------------------------


def test_last_modified_is_taken_as_up_to_a_second_late(local: LocalDirStore) -> None:
    """S3 keeps whole seconds: an object uploaded at 12:00:00.9 says
    12:00:00. GC must not count that 0.9 s into its age."""
    for n, age in enumerate((10.5, 11.5)):
        local.put(_pack_key(n), b"garbage")
        _age(local, _pack_key(n), age)
    report = collect_garbage(local, grace=10, commit_deadline=1)
    assert report.deleted_keys == [_pack_key(1)]
    assert report.kept_young == 1 and _exists(local, _pack_key(0))


# --- an identical re-upload racing the deletion --------------------------------------


class _ReuploadBeforeDelete(ForwardingStore):
    """A flush's identical re-upload landing after GC chose to delete an
    object (from its listing) and before GC's DELETE reaches the store."""

    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        self.inner.put(key, self.inner.get(key))
        self.inner.delete(key, if_unmodified_since=if_unmodified_since)


def test_reupload_between_decision_and_delete_survives(store: ObjectStore) -> None:
    store.put(_pack_key(7), b"a pack no root reaches")
    # The run may delete for grace - 2 * deadline = 0.8 s: a loaded machine's
    # moto listing took longer than the 0.1 s this test once allowed.
    grace = 1.0
    time.sleep(grace + gc_module.TIMESTAMP_RESOLUTION + 0.2)  # old enough to collect
    report = collect_garbage(_ReuploadBeforeDelete(store), grace=grace, commit_deadline=0.1)
    assert report.deleted == 0 and report.kept_young == 1, report.summary()
    assert store.get(_pack_key(7)) == b"a pack no root reaches"


# --- the bound on a run --------------------------------------------------------------


def test_gc_stops_deleting_once_its_roots_are_too_old(
        local: LocalDirStore, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(3):
        local.put(_pack_key(n), b"garbage")
        _age(local, _pack_key(n), 3600)
    # grace 10 s, deadline 1 s: deletions may go on for 8 s after the roots
    # were read. The clock reads 0 then (roots, first deletion), then 100.
    readings = iter([0.0, 0.0])
    monkeypatch.setattr(gc_module, "deadline_clock", lambda: next(readings, 100.0))
    rc = main(["gc", "--store", str(local.root), "--grace", "10s", "--commit-deadline", "1s"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "deleted 1 " in out and "gc stopped deleting" in err and "8s" in err, (out, err)
    assert sum(_exists(local, _pack_key(n)) for n in range(3)) == 2

    monkeypatch.setattr(gc_module, "deadline_clock", lambda: 0.0)
    assert collect_garbage(local, grace=10, commit_deadline=1).deleted == 2  # goes on


def test_gc_stopped_carries_the_report(local: LocalDirStore,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    local.put(_pack_key(0), b"garbage")
    _age(local, _pack_key(0), 3600)
    readings = iter([0.0])
    monkeypatch.setattr(gc_module, "deadline_clock", lambda: next(readings, 9.0))
    with pytest.raises(GcStopped) as stopped:
        collect_garbage(local, grace=10, commit_deadline=1)
    assert stopped.value.report.deleted == 0 and _exists(local, _pack_key(0))
