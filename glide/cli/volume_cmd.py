"""`glidefs status` and `glidefs volume list|create|resize|delete|sync`: clients
of the running daemon's admin API over its Unix socket."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from glide.block import BLOCK_SIZE
from glide.cli.client import AdminClient
from glide.config import Config, load_file, parse_size
from glide.errors import GlideError
from glide.progress import Progress, human_bytes, human_seconds


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (to find the data directory)")
    p.add_argument("--data-dir", type=Path, help="the daemon's data directory")
    p.add_argument("--socket", type=Path, help="admin socket (default <data-dir>/admin.sock)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def client_from_args(args: argparse.Namespace) -> AdminClient:
    if args.socket:
        return AdminClient(args.socket)
    cfg = load_file(args.config) if args.config else Config()
    if args.data_dir:
        cfg.data_dir = args.data_dir
    return AdminClient(Path(cfg.admin_socket_path()).absolute())


def _print_json(doc: Any) -> None:  # noqa: ANN401
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{human_seconds(seconds)} ago"


def _table(rows: list[dict[str, Any]]) -> None:
    head = ("NAME", "SIZE", "ORIGIN", "CONN", "DIRTY", "CACHED", "VERSION", "COMMITTED",
            "EXPORT")
    lines = [head]
    for v in rows:
        lines.append((v["name"], human_bytes(v["size"]), v["origin"], str(v["connections"]),
                      human_bytes(v["dirty_bytes"]), human_bytes(v["cache_bytes"]),
                      f"v{v['last_committed_version']}", _age(v["last_commit_age_seconds"]),
                      (v.get("ublk_device") or "nbd") + (" (read-only)" if v["read_only"]
                                                         else "")))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for r in lines:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    st = client_from_args(args).request("GET", "/v1/status")
    if args.json:
        _print_json(st)
        return 0
    print(f"glidefs {st['version']}, pid {st['pid']}, up {human_seconds(st['uptime_seconds'])}"
          f", {st['phase']}{'' if st['ready'] else ' (not ready: ' + st['detail'] + ')'}")
    from glide.cli.handoff_cmd import render_state  # it imports this module

    print(f"data dir {st['data_dir']}, store {st['store']}")
    print(render_state(st["handoff"]))
    print()
    _table(st["volumes"])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    doc = client_from_args(args).request("GET", "/v1/volumes")
    if args.json:
        _print_json(doc)
    else:
        _table(doc["volumes"])
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "SIZE")
    v = client_from_args(args).request("POST", "/v1/volumes", {"name": args.name, "size": size})
    if args.json:
        _print_json(v)
    else:
        print(f"created volume {v['name']} ({human_bytes(v['size'])}); connect with "
              f"nbd+unix:///{v['name']}?socket={v['exports']['nbd_unix']}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "SIZE")
    v = client_from_args(args).request("PATCH", f"/v1/volumes/{args.name}", {"size": size})
    if args.json:
        _print_json(v)
    else:
        note = ""
        if v["exports"].get("ublk_device"):
            note = " (see the daemon's log for the ublk device's size)"
        print(f"volume {v['name']} is now {human_bytes(v['size'])}; NBD clients see it on "
              f"their next connection{note}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    q = []
    if args.force:
        q.append("force=true")
    if args.purge:
        q.append("purge=true")
    path = f"/v1/volumes/{args.name}" + ("?" + "&".join(q) if q else "")
    doc = client_from_args(args).request("DELETE", path)
    if args.json:
        _print_json(doc)
    elif doc["purged"]:
        print(f"deleted volume {args.name} and its root in the store (gc reclaims its packs)")
    else:
        print(f"deleted volume {args.name}; the store keeps it at manifest "
              f"v{doc['last_committed_version']} (delete with --purge to drop it there too)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Online sync, with progress from the volume's dirty bytes while it runs."""
    client = client_from_args(args)
    before = client.request("GET", f"/v1/volumes/{args.name}")
    total = before["dirty_bytes"]  # until the sync's own count is known
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.update(client.request("POST", f"/v1/volumes/{args.name}/sync"))
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            failure.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    progress = None if args.json else Progress(f"sync {args.name}", total or None)
    while t.is_alive():
        t.join(0.5)
        if progress is not None and t.is_alive():
            try:
                now = client.request("GET", f"/v1/volumes/{args.name}")
                p = now.get("sync_progress")
                if p:
                    progress.update(p["blocks_done"] * BLOCK_SIZE, p["blocks_total"] * BLOCK_SIZE)
            except GlideError:
                pass
    if failure:
        raise failure[0]
    if args.json:
        _print_json(result)
    else:
        assert progress is not None
        progress.done = result["blocks"] * BLOCK_SIZE
        progress.finish(f"sync {args.name}: {human_bytes(result['blocks'] * BLOCK_SIZE)} synced, "
                        f"committed manifest v{result['version']}")
    return 0


def add_parsers(sub: Any, vol: Any) -> None:  # noqa: ANN401
    s = sub.add_parser("status", help="the running daemon's state and volumes")
    add_client_args(s)
    s.set_defaults(func=cmd_status)
    p = vol.add_parser("list", help="volumes of the running daemon")
    add_client_args(p)
    p.set_defaults(func=cmd_list)
    p = vol.add_parser("create", help="create a volume on the running daemon (persisted)")
    add_client_args(p)
    p.add_argument("name")
    p.add_argument("size", help="e.g. 20G, 512MiB, 1073741824")
    p.set_defaults(func=cmd_create)
    p = vol.add_parser("resize", help="grow a volume of the running daemon")
    add_client_args(p)
    p.add_argument("name")
    p.add_argument("size", help="the new size, not smaller than now")
    p.set_defaults(func=cmd_resize)
    p = vol.add_parser("delete", help="stop serving a volume and remove it")
    add_client_args(p)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="disconnect connected clients")
    p.add_argument("--purge", action="store_true",
                   help="also remove it from the store (gc then reclaims its packs)")
    p.set_defaults(func=cmd_delete)
    p = vol.add_parser("sync", help="online: upload everything acknowledged and commit now")
    add_client_args(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_sync)


