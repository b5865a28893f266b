"""`glidefs snapshot create|list|delete` and `glidefs volume clone|rollback`:
clients of the running daemon's admin API (glide/snapshot/ does the work)."""

from __future__ import annotations

import argparse
import time
from typing import Any
from urllib.parse import quote

from glide.cli.volume_cmd import _print_json, add_client_args, client_from_args
from glide.config import parse_duration
from glide.errors import UsageError
from glide.progress import human_bytes


def _when(unix: float | None) -> str:
    return "-" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix))


def _path(volume: str, *rest: str) -> str:
    return "/v1/volumes/" + "/".join(quote(p, safe="") for p in (volume, *rest))


def cmd_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "hooks": args.hook}
    if args.hook_timeout:
        body["hook_timeout"] = parse_duration(args.hook_timeout, "--hook-timeout")
    if args.max_quiesce:
        body["max_quiesce"] = parse_duration(args.max_quiesce, "--max-quiesce")
    s = client_from_args(args).request("POST", _path(args.volume, "snapshots"), body)
    if args.json:
        _print_json(s)
        return 0
    freeze = "" if s["freeze_ms"] is None else f", application frozen {s['freeze_ms']:.1f} ms"
    print(f"snapshot {s['volume']}@{s['name']} committed: manifest v{s['version']}, "
          f"{s['consistency']}-consistent{freeze}")
    if s.get("error"):
        print(f"warning: {s['error']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    doc = client_from_args(args).request("GET", _path(args.volume, "snapshots"))
    if args.json:
        _print_json(doc)
        return 0
    rows = [("NAME", "STATE", "CREATED (UTC)", "VERSION", "SIZE", "CONSISTENCY", "NOTE")]
    for s in doc["snapshots"]:
        rows.append((s["name"], s["state"], _when(s["created_unix"]),
                     "-" if s["version"] is None else f"v{s['version']}",
                     "-" if s["size"] is None else human_bytes(s["size"]), s["consistency"],
                     s.get("error") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    doc = client_from_args(args).request("DELETE", _path(args.volume, "snapshots", args.name))
    if args.json:
        _print_json(doc)
    else:
        print(f"deleted snapshot {args.volume}@{args.name} (gc reclaims what nothing else "
              "reaches)")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    volume, sep, snap = args.source.partition("@")
    if not sep or not volume or not snap:
        raise UsageError(f"clone source {args.source!r}: expected VOLUME@SNAPSHOT")
    v = client_from_args(args).request("POST", _path(volume, "snapshots", snap, "clone"),
                                       {"name": args.name})
    if args.json:
        _print_json(v)
    else:
        print(f"created volume {v['name']} ({human_bytes(v['size'])}) from {args.source}; "
              f"connect with nbd+unix:///{v['name']}?socket={v['exports']['nbd_unix']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    v = client_from_args(args).request("POST", _path(args.volume, "rollback"),
                                       {"snapshot": args.snapshot, "force": args.force})
    if args.json:
        _print_json(v)
    else:
        print(f"volume {v['name']} now holds snapshot {args.snapshot}'s content "
              f"(manifest v{v['last_committed_version']})")
    return 0


def add_parsers(sub: Any, vol: Any) -> None:  # noqa: ANN401
    snap = sub.add_parser("snapshot", help="snapshots of the running daemon's volumes")
    ss = snap.add_subparsers(dest="snapshot_command", required=True)
    p = ss.add_parser("create", help="take a snapshot (committed when this returns)")
    add_client_args(p)
    p.add_argument("volume")
    p.add_argument("name", nargs="?", help="default snap-<UTC time>")
    p.add_argument("--hook", action="append", default=[], metavar="CMD",
                   help="a shell command run before the cut with GLIDEFS_HOOK=pre and after "
                        "it with GLIDEFS_HOOK=post (repeatable; post hooks run in reverse)")
    p.add_argument("--hook-timeout", help="per hook (default [snapshot] hook_timeout, 30s)")
    p.add_argument("--max-quiesce",
                   help="how long the pre hooks may take (default [snapshot] max_quiesce, 10s)")
    p.set_defaults(func=cmd_create)
    p = ss.add_parser("list", help="committed, pending and failed snapshots of a volume")
    add_client_args(p)
    p.add_argument("volume")
    p.set_defaults(func=cmd_list)
    p = ss.add_parser("delete", help="delete a snapshot (its clones keep working)")
    add_client_args(p)
    p.add_argument("volume")
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)
    p = vol.add_parser("clone", help="a new volume with a snapshot's content (shares its packs)")
    add_client_args(p)
    p.add_argument("source", metavar="VOLUME@SNAPSHOT")
    p.add_argument("name", help="the new volume")
    p.set_defaults(func=cmd_clone)
    p = vol.add_parser("rollback", help="make a volume's content a snapshot's")
    add_client_args(p)
    p.add_argument("volume")
    p.add_argument("snapshot")
    p.add_argument("--force", action="store_true", help="disconnect connected clients")
    p.set_defaults(func=cmd_rollback)
