"""The `glidefs` command.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error or a
data directory already in use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from glide import __version__
from glide.config import (
    Config,
    ConfigError,
    ensure_default_volume,
    load_file,
    parse_duration,
    parse_size,
    parse_volume_spec,
    validate,
)

log = logging.getLogger("glide.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glidefs", description="glidefs block-device cache")
    p.add_argument("--version", action="version", version=f"glidefs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon (no arguments: embedded defaults)")
    s.add_argument("--config", type=Path, help="TOML config file")
    s.add_argument("--data-dir", type=Path, help="data directory (WAL, cache, state)")
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
    s.add_argument("--checkpoint-interval", help="checkpoint dirty volumes this often (default 5s)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_file(args.config) if args.config else Config()
    if args.data_dir:
        cfg.data_dir = args.data_dir
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
    if args.checkpoint_interval:
        cfg.checkpoint_interval = parse_duration(args.checkpoint_interval, "--checkpoint-interval")
    cfg.data_dir = cfg.data_dir.absolute()
    validate(cfg)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from glide import logs
    from glide.daemon import Daemon, DataDirInUse

    logs.setup(args.log_level)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"glidefs: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        return Daemon(cfg).run()
    except DataDirInUse as e:
        print(f"glidefs: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a volume that disagrees with its config (size)
        print(f"glidefs: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"glidefs: cannot start: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
