"""`glidefs replication status|run|prune`: clients of the running daemon's
admin API (glide/replication/ does the work)."""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any
from urllib.parse import quote

from glide.cli.volume_cmd import _print_json, add_client_args, client_from_args
from glide.errors import GlideError
from glide.progress import Progress, human_bytes, human_seconds


def _when(unix: float | None) -> str:
    return "-" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix))


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def print_status(doc: dict[str, Any]) -> None:
    if not doc["jobs"]:
        print("no replication jobs configured ([[replication]] in the config file)")
    for job in doc["jobs"]:
        line = f"job {job['job']} -> {job['target']}: {job['state']}"
        if job.get("last_success_unix"):
            line += f", last success {_when(job.get('last_success_unix'))} UTC"
        print(line)
        if job.get("last_error"):
            print(f"  {job.get('error_kind')} error: {job.get('last_error')}")
            if job["state"] == "failed":
                print(f"  stopped; fix the cause, then `glidefs replication run {job['job']}`")
            elif job.get("next_retry_unix"):
                print(f"  next retry {_when(job.get('next_retry_unix'))} UTC")
        rows = [("  VOLUME", "STATE", "NEWEST ON TARGET", "LAG", "BEHIND", "STEP")]
        for v in job["volumes"]:
            lag = "-" if v.get("lag_seconds") is None else human_seconds(v.get("lag_seconds"))
            step = ""
            if v.get("step"):
                s = v["step"]
                step = (f"{s['snapshot']} {s['phase']} {human_bytes(s['bytes_done'])}/"
                        f"{human_bytes(s['bytes_expected'])}")
                if s.get("eta_seconds") is not None:
                    step += f" ETA {human_seconds(s['eta_seconds'])}"
            rows.append(("  " + v["volume"], v["state"], v.get("newest_on_target") or "-", lag,
                         str(v["snapshots_behind"]), step))
        if len(rows) > 1:
            _table(rows)
        for v in job["volumes"]:
            if v.get("last_error") and v.get("last_error") != job.get("last_error"):
                print(f"  {v['volume']}: {v.get('last_error')}")
            if v.get("warning"):
                print(f"  warning: {v['volume']}: {v['warning']}")
    if doc.get("pins") is not None:
        print("pins on the source (GC and pruning keep these snapshots):")
        if not doc["pins"]:
            print("  none")
        else:
            rows = [("  VOLUME", "SNAPSHOT", "JOB", "WHY", "SINCE (UTC)")]
            for p in doc["pins"]:
                rows.append(("  " + p["volume"], p["snapshot"], p["job"], p["reason"],
                             _when(p["since_unix"])))
            _table(rows)


def cmd_status(args: argparse.Namespace) -> int:
    path = "/v1/replication" + ("?pins=true" if args.pins else "")
    doc = client_from_args(args).request("GET", path)
    if args.json:
        _print_json(doc)
    else:
        print_status(doc)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Starts the run and, on a terminal or with --progress, shows the step
    in progress while waiting for the outcome."""
    client = client_from_args(args)
    client.timeout = None  # a first copy of a large volume takes as long as it takes
    path = f"/v1/replication/{quote(args.job, safe='')}/run"
    result: dict[str, Any] = {}
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.update(client.request("POST", path + ("?wait=true" if args.wait
                                                         else "?wait=false")))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    progress = None if args.json or not args.wait else Progress(f"replication {args.job}", None)
    while t.is_alive():
        t.join(0.5)
        if progress is None or not t.is_alive():
            continue
        try:
            doc = client.request("GET", "/v1/replication")
        except GlideError:
            continue
        for job in doc["jobs"]:
            for v in job["volumes"] if job["job"] == args.job else []:
                if v.get("step"):
                    s = v["step"]
                    progress.label = f"replication {args.job} {v['volume']}@{s['snapshot']}"
                    progress.update(s["bytes_done"], s["bytes_expected"] or None)
    if error:
        raise error[0]
    if progress is not None:
        progress.finish(f"replication {args.job}: {result['state']}, "
                        f"{human_bytes(result['bytes_sent'])} sent in total")
    if args.json:
        _print_json(result)
        return 0
    print_status({"jobs": [result]})
    return 1 if args.wait and result["state"] in ("failed", "retrying") else 0


def cmd_prune(args: argparse.Namespace) -> int:
    path = (f"/v1/replication/{quote(args.job, safe='')}/prune"
            + ("?dry_run=true" if args.dry_run else ""))
    doc = client_from_args(args).request("POST", path)
    if args.json:
        _print_json(doc)
        return 0
    verb = "would destroy" if args.dry_run else "destroyed"
    for v in doc["volumes"]:
        for side in ("source", "target"):
            rows = v.get(side)
            if rows is None:
                continue
            print(f"{v['volume']} on the {side}:")
            if not rows:
                print("  no snapshots")
            for r in rows:
                why = ", ".join(r["kept_by"]) if r["keep"] else "no rule keeps it"
                print(f"  {'keep' if r['keep'] else verb:13} {r['snapshot']}  ({why})")
        if v.get("target_error"):
            print(f"{v['volume']} on the target: {v['target_error']}")
    return 0


def add_parsers(sub: Any) -> None:  # noqa: ANN401
    rep = sub.add_parser("replication", help="copies of snapshots in a second store")
    rs = rep.add_subparsers(dest="replication_command", required=True)
    p = rs.add_parser("status", help="per job and volume: state, lag, step in progress")
    add_client_args(p)
    p.add_argument("--pins", action="store_true", help="also what each job pins, and why")
    p.set_defaults(func=cmd_status)
    p = rs.add_parser("run", help="run a job now (also one stopped by an error)")
    add_client_args(p)
    p.add_argument("job")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return once started")
    p.set_defaults(func=cmd_run)
    p = rs.add_parser("prune", help="apply a job's keep_source and keep_target rules now")
    add_client_args(p)
    p.add_argument("job")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would go and which rule decided; destroy nothing")
    p.set_defaults(func=cmd_prune)
