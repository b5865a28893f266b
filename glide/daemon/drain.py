"""`glidefs volume drain`: the offline sync of one volume, daemon stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable

from glide.block import BLOCK_SIZE
from glide.config import Config, VolumeConfig
from glide.daemon.lock import DataDirInUse, DataDirLock
from glide.progress import Progress
from glide.store import from_config
from glide.volume.flusher import FlushStats
from glide.volume.served import ServedVolume, store_identity


def watch_sync(sv: ServedVolume, label: str) -> FlushStats | None:
    """One sync of `sv` on this thread, with its progress (blocks packed,
    rate, ETA) drawn on a terminal or printed as plain lines elsewhere."""
    progress = Progress(label, None)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            total = sv.flusher.progress_total
            if total:
                progress.update(sv.flusher.progress_done * BLOCK_SIZE, total * BLOCK_SIZE)

    t = threading.Thread(target=watch, name="drain-progress", daemon=True)
    t.start()
    try:
        st = sv.flush()
    finally:
        done.set()
        t.join()
    if st is not None:  # a fast sync may end before the first look
        progress.done = progress.total = st.blocks * BLOCK_SIZE
        progress.finish()
    return st


def drain_volume(cfg: Config, vc: VolumeConfig, say: Callable[[str], None]) -> int:
    """`glidefs volume drain`: flush everything one volume's cache holds, with
    the daemon stopped (the data-directory lock makes sure of that). Exits 0
    only when the store holds every block the cache had."""
    lock = DataDirLock(cfg.data_dir)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire()
    except DataDirInUse as e:
        raise DataDirInUse(f"{e}. A running daemon flushes on stop: stop it (systemctl stop "
                           "glidefs), then drain.") from None
    store = from_config(cfg.store, cfg.data_dir)
    try:
        store.check_conditional_put()
        sv = ServedVolume.open(cfg, vc, store, store_identity(store))
        try:
            dirty = sv.dirty_blocks()
            say(f"drain {vc.name}: {dirty} dirty blocks ({dirty * BLOCK_SIZE / (1 << 20):.1f} MiB) "
                f"to flush to {cfg.store.describe(cfg.data_dir)}")
            total = 0
            while sv.needs_adopt or sv.dirty_blocks():
                st = watch_sync(sv, f"drain {vc.name}")
                if st is None:
                    break
                total += st.blocks
                say(f"drain {vc.name}: flushed {total}/{max(dirty, total)} blocks "
                    f"({st.stored} stored in {st.packs} packs, {st.pack_bytes} bytes, "
                    f"{st.zeroed} zero) -> manifest v{sv.manifest.version}")
            say(f"drain {vc.name}: done; the store holds everything at manifest "
                f"v{sv.manifest.version}")
        finally:
            sv.close()
    finally:
        store.close()
        lock.release()
    return 0
