"""The `glidefs` command.

Exit codes: 0 success, 1 runtime failure (also a handoff that did not
complete), 2 usage or configuration error or a data directory already in use,
3 no daemon running (commands that talk to one).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from glide import __version__
from glide.cli import handoff_cmd, replication_cmd, snapshot_cmd, volume_cmd
from glide.config import (
    Config,
    ConfigError,
    VolumeConfig,
    ensure_default_volume,
    load_file,
    parse_duration,
    parse_nice,
    parse_size,
    parse_store_url,
    parse_volume_spec,
    validate,
)
from glide.errors import GlideError
from glide.progress import Progress

log = logging.getLogger("glide.cli")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--data-dir", type=Path, help="data directory (WAL, cache, state)")
    p.add_argument(
        "--store", metavar="DIR|s3://BUCKET/PREFIX",
        help="object store: a directory (default <data-dir>/store) or an S3 bucket and prefix",
    )
    p.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (MinIO, Ceph, R2, ...)")
    p.add_argument(
        "--commit-deadline", metavar="PERIOD",
        help="a flush commits only packs it began uploading less than this long ago; gc's "
             "--grace must exceed twice the daemons' value (default 10m, [store] "
             "commit_deadline)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"],
                   help="logfmt lines (text, the default) or one JSON object per line")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glidefs", description="glidefs block-device cache")
    p.add_argument("--version", action="version", version=f"glidefs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon (no arguments: embedded defaults)")
    _common(s)
    s.add_argument("--nbd-unix", help="NBD Unix socket path (default <data-dir>/nbd.sock)")
    s.add_argument("--nbd-tcp", help="NBD TCP HOST:PORT, or 'none' (default 127.0.0.1:10809)")
    s.add_argument(
        "--volume", action="append", default=[], metavar="NAME:SIZE",
        help="export a volume (repeatable); replaces the config file's volumes",
    )
    s.add_argument(
        "--ublk", action="append", default=[], metavar="NAME[:ID]",
        help="also export volume NAME as /dev/ublkbN (optionally with device id ID)",
    )
    s.add_argument(
        "--release-devices", action="store_true",
        help="on shutdown stop and delete ublk devices (default: leave them for the next daemon)",
    )
    s.add_argument("--wal-budget", help="WAL bytes before writers wait (default 1GiB)")
    s.add_argument("--wal-segment-size", help="WAL segment size (default 64MiB)")
    s.add_argument("--flush-interval", help="flush dirty volumes to the store this often (5s)")
    s.add_argument("--cache-size", help="cache-file bytes per volume before eviction (no limit)")
    s.add_argument("--sequential-cutoff", metavar="SIZE",
                   help="contiguous dirty runs this long skip the cache file, the store keeps "
                        "them (4M; 0: cache everything)")
    s.add_argument("--sync-nice", metavar="N",
                   help="nice value of sync's pack-build, upload and write-back threads "
                        "(10; 0: same as the I/O threads)")
    s.add_argument("--api-listen", metavar="HOST:PORT",
                   help="also serve the admin API on TCP (needs --api-token-file)")
    s.add_argument("--api-token-file", type=Path,
                   help="file holding the bearer token the TCP admin listener requires")
    s.add_argument("--pid-file", type=Path, metavar="PATH",
                   help="write the daemon's pid here (systemd's PIDFile=; a handoff rewrites "
                        "it with the new daemon's pid); config key pid_file")

    vol = sub.add_parser("volume", help="volume operations").add_subparsers(
        dest="volume_command", required=True)
    volume_cmd.add_parsers(sub, vol)
    snapshot_cmd.add_parsers(sub, vol)
    handoff_cmd.add_parser(sub)
    replication_cmd.add_parsers(sub)
    d = vol.add_parser("drain", help="flush everything a volume's cache holds to the store "
                       "(offline: the daemon must be stopped)")
    _common(d)
    d.add_argument("name", help="volume name")
    d.add_argument("--size", help="volume size, if the config does not name the volume")

    g = sub.add_parser("gc", help="delete store objects no volume reaches")
    _common(g)
    g.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    g.add_argument("--metrics-file", metavar="PATH",
                   help="also write the run's outcome here in Prometheus text format "
                        "(for node_exporter's textfile collector; PATH should end in .prom)")
    g.add_argument("--grace", default="1h",
                   help="keep unreachable objects younger than this (default 1h; more than "
                        "twice the commit deadline)")
    return p


def _base_config(args: argparse.Namespace) -> Config:
    cfg = load_file(args.config) if args.config else Config()
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.store:
        parse_store_url(args.store, cfg.store)
    if args.s3_endpoint:
        cfg.store.endpoint_url = args.s3_endpoint
    if args.commit_deadline:
        cfg.store.commit_deadline = parse_duration(args.commit_deadline, "--commit-deadline")
    return cfg


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = _base_config(args)
    if args.nbd_unix:
        cfg.nbd_unix = args.nbd_unix
    if args.nbd_tcp:
        cfg.nbd_tcp = None if args.nbd_tcp == "none" else args.nbd_tcp
    if args.volume:
        cfg.volumes = [parse_volume_spec(v) for v in args.volume]
    ensure_default_volume(cfg)
    for spec in args.ublk:
        name, _, dev = spec.partition(":")
        match = [v for v in cfg.volumes if v.name == name]
        if not match:
            raise ConfigError(f"--ublk {spec}: no volume named {name!r}")
        match[0].ublk = True
        if dev:
            if not dev.isdigit():
                raise ConfigError(f"--ublk {spec}: device id must be a number")
            match[0].ublk_id = int(dev)
    if args.release_devices:
        cfg.release_devices = True
    if args.wal_budget:
        cfg.wal_budget = parse_size(args.wal_budget, "--wal-budget")
    if args.wal_segment_size:
        cfg.wal_segment_size = parse_size(args.wal_segment_size, "--wal-segment-size")
    if args.flush_interval:
        cfg.flush_interval = parse_duration(args.flush_interval, "--flush-interval")
    if args.cache_size:
        cfg.cache_size = parse_size(args.cache_size, "--cache-size") or None
    if args.sequential_cutoff is not None:
        cfg.sequential_cutoff = parse_size(args.sequential_cutoff, "--sequential-cutoff")
    if args.sync_nice is not None:
        cfg.sync_nice = parse_nice(args.sync_nice, "--sync-nice")
    if args.api_listen:
        cfg.api.listen = None if args.api_listen == "none" else args.api_listen
    if args.api_token_file:
        cfg.api.token_file = args.api_token_file
    if args.log_format:
        cfg.log_format = args.log_format
    if args.pid_file:
        cfg.pid_file = args.pid_file.absolute()
    cfg.data_dir = cfg.data_dir.absolute()
    validate(cfg)
    return cfg


def _run(what: str, fn: Callable[[], int]) -> int:
    """Maps every failure onto a message and an exit code through the one
    error hierarchy (glide/errors.py)."""
    from glide.errors import GlideError, UsageError
    from glide.store import StoreError

    try:
        return fn()
    except StoreError as e:
        print(f"glidefs: {what}: object store error: {e}", file=sys.stderr)
        return e.exit_code
    except UsageError as e:
        print(f"glidefs: {e}", file=sys.stderr)
        return e.exit_code
    except GlideError as e:
        print(f"glidefs: {what}: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"glidefs: {what}: {e}", file=sys.stderr)
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    from glide.daemon.main import Daemon

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"glidefs: configuration error: {e}", file=sys.stderr)
        return 2
    return _run("cannot start", Daemon(cfg).run)


def cmd_drain(args: argparse.Namespace) -> int:
    from glide.daemon.drain import drain_volume
    from glide.volume.registry import VolumeRegistry

    try:
        cfg = _base_config(args)
        ensure_default_volume(cfg)
        # The daemon's rule: config and API volumes together, sizes grown.
        served = VolumeRegistry.load(cfg.data_dir).served_volumes(cfg, persist=False)
        match = [v for v in served if v.name == args.name]
        if args.size:
            cfg.volumes = [VolumeConfig(args.name, parse_size(args.size, "--size"))]
        elif match:
            cfg.volumes = match
        else:
            raise ConfigError(f"no volume named {args.name!r} in the configuration or in "
                              f"{cfg.data_dir / 'volumes.json'}; give its --size")
        cfg.data_dir = cfg.data_dir.absolute()
        validate(cfg)
    except ConfigError as e:
        print(f"glidefs: configuration error: {e}", file=sys.stderr)
        return 2
    except GlideError as e:  # a damaged volumes.json
        print(f"glidefs: {e}", file=sys.stderr)
        return e.exit_code
    return _run(f"drain {args.name}", lambda: drain_volume(cfg, cfg.volumes[0], print))


def cmd_gc(args: argparse.Namespace) -> int:
    from glide.api.metrics import write_gc_textfile
    from glide.repo.gc import GcStopped, GraceTooShort, check_grace, collect_garbage
    from glide.store import from_config
    from glide.store.metered import MeteredStore

    try:
        cfg = _base_config(args)
        grace = parse_duration(args.grace, "--grace")
        validate(cfg)
        deadline = cfg.store.commit_deadline
        check_grace(grace, deadline)
    except GraceTooShort as e:
        print(f"glidefs: gc refused: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"glidefs: configuration error: {e}", file=sys.stderr)
        return 2

    def gc() -> int:
        store = MeteredStore(from_config(cfg.store, cfg.data_dir.absolute()))
        progress = Progress("gc: objects deleted" if not args.dry_run else "gc: objects read",
                            None, unit="objects")
        done = threading.Event()

        def watch() -> None:  # deletions (or reads, dry) as they happen
            while not done.wait(0.25):
                ops = store.snapshot()
                progress.update(ops["delete"].requests if not args.dry_run
                                else ops["get"].requests + ops["head"].requests)

        watcher = threading.Thread(target=watch, name="gc-progress", daemon=True)
        watcher.start()
        t0 = time.monotonic()
        try:
            report = collect_garbage(store, grace=grace, commit_deadline=deadline,
                                     dry_run=args.dry_run)
        except GcStopped as e:
            if args.metrics_file:
                write_gc_textfile(args.metrics_file, e.report, time.monotonic() - t0, False)
            print(e.report.summary())
            print(f"glidefs: {e}", file=sys.stderr)
            return 1
        finally:
            done.set()
            watcher.join()
            store.close()
        if args.metrics_file:
            write_gc_textfile(args.metrics_file, report, time.monotonic() - t0, True)
        if progress.done:
            progress.finish()
        print(report.summary())
        return 0

    return _run("gc", gc)


def _log_format(args: argparse.Namespace) -> str:
    """--log-format, else the config file's [log] format, else text."""
    if getattr(args, "log_format", None):
        return args.log_format
    path = getattr(args, "config", None)
    if path is not None:
        try:
            return load_file(path).log_format
        except ConfigError:
            return "text"  # the command reports the config error itself
    return "text"


def main(argv: list[str] | None = None) -> int:
    from glide import logs

    args = build_parser().parse_args(argv)
    logs.setup(getattr(args, "log_level", "info"), _log_format(args))
    if hasattr(args, "func"):  # a client of the running daemon
        try:
            return args.func(args)
        except GlideError as e:
            print(f"glidefs: {e}", file=sys.stderr)
            return e.exit_code
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "volume" and args.volume_command == "drain":
        return cmd_drain(args)
    if args.command == "gc":
        return cmd_gc(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
