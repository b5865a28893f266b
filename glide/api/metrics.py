"""Prometheus metrics: a collector that reads the daemon's counters at scrape time.

The I/O path counts in C (`Volume.metrics()`: requests, bytes, errors and a
latency histogram per op, in-flight requests, cache hits and misses); the
store cycle and the store client count in Python where they already run
(glide/volume/sync_stats.py, glide/store/metered.py). Nothing here runs per
guest request: a scrape walks the volumes once and turns counters into
metric families. Names and labels are the contract in operator.md.

Keeps: histograms are exposed cumulative with `+Inf` equal to the count,
as the text format requires; a volume that disappears between listing and
reading is skipped, never an error for the whole scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from glide import _native
from glide.block import BLOCK_SIZE
from glide.histogram import HistogramSnapshot
from glide.store.metered import MeteredStore

IO_OPS = ("read", "write", "flush", "trim", "write_zeroes")
# Latency histograms for the ops whose latency a guest feels; trim and
# write_zeroes are metadata records (their counters stay). A histogram is
# 15 series per volume and op: this keeps a 100-volume scrape smaller.
TIMED_OPS = ("read", "write", "flush")


def _buckets(h: HistogramSnapshot) -> list[tuple[str, float]]:
    return _cumulative(h.bounds, h.counts)


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip(bounds, counts, strict=False):
        total += n
        out.append((repr(float(bound)), total))
    total += sum(counts[len(bounds):])
    out.append(("+Inf", total))
    return out


class DaemonCollector:
    """Reads a control facade's volumes and store at scrape time."""

    def __init__(self, control: Any) -> None:  # noqa: ANN401
        self.control = control
        self.bounds: tuple[float, ...] = _native.LATENCY_BUCKETS

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are built per scrape

    def collect(self) -> Iterator[Metric]:
        c = self.control
        io_req = CounterMetricFamily("glidefs_io_requests", "I/O requests served",
                                     labels=["volume", "op"])
        io_bytes = CounterMetricFamily("glidefs_io_bytes", "bytes read or written by guests",
                                       labels=["volume", "op"])
        io_err = CounterMetricFamily("glidefs_io_errors", "I/O requests answered with an error",
                                     labels=["volume", "op"])
        io_lat = HistogramMetricFamily("glidefs_io_request_duration_seconds",
                                       "time from request to reply", labels=["volume", "op"])
        inflight = GaugeMetricFamily("glidefs_io_inflight_requests", "requests in progress",
                                     labels=["volume"])
        wal = GaugeMetricFamily("glidefs_wal_bytes", "WAL bytes not yet retired",
                                labels=["volume"])
        budget = GaugeMetricFamily("glidefs_wal_budget_bytes",
                                   "WAL bytes before writers wait", labels=["volume"])
        dirty = GaugeMetricFamily("glidefs_dirty_bytes", "acknowledged bytes not yet in the "
                                  "store", labels=["volume"])
        size = GaugeMetricFamily("glidefs_volume_size_bytes", "volume size", labels=["volume"])
        conns = GaugeMetricFamily("glidefs_volume_connections", "connected NBD clients",
                                  labels=["volume"])
        cached = GaugeMetricFamily("glidefs_cache_bytes", "bytes held in the cache file",
                                   labels=["volume"])
        hits = CounterMetricFamily("glidefs_cache_hits", "reads served locally",
                                   labels=["volume"])
        misses = CounterMetricFamily("glidefs_cache_misses", "blocks read through from the "
                                     "store", labels=["volume"])
        evicted = CounterMetricFamily("glidefs_cache_evicted_bytes", "bytes evicted from the "
                                      "cache file", labels=["volume"])
        syncs = CounterMetricFamily("glidefs_syncs", "store sync cycles by result",
                                    labels=["volume", "result"])
        sync_dur = HistogramMetricFamily("glidefs_sync_duration_seconds",
                                         "store sync cycle duration", labels=["volume"])
        sync_bytes = CounterMetricFamily("glidefs_sync_bytes", "guest bytes synced to the store",
                                         labels=["volume"])
        last_commit = GaugeMetricFamily("glidefs_last_commit_timestamp_seconds",
                                        "when the volume's last manifest version was "
                                        "committed (unix time)", labels=["volume"])
        readthrough = HistogramMetricFamily(
            "glidefs_cache_readthrough_duration_seconds",
            "time to resolve a batch of read misses from the store (the longest a parked "
            "read waits)", labels=["volume"])
        version = GaugeMetricFamily("glidefs_manifest_version", "last committed manifest "
                                    "version", labels=["volume"])
        for name, sv in sorted(c.volumes.items()):
            try:
                stats = sv.vol.stats()
                m = sv.vol.metrics()
            except (ValueError, OSError):  # closed by a delete meanwhile
                continue
            for op in IO_OPS:
                o = m["ops"][op]
                io_req.add_metric([name, op], o["requests"])
                io_bytes.add_metric([name, op], o["bytes"])
                io_err.add_metric([name, op], o["errors"])
                if op in TIMED_OPS:
                    io_lat.add_metric([name, op], _cumulative(self.bounds, o["buckets"]),
                                      o["sum_ns"] / 1e9)
            inflight.add_metric([name], m["inflight"])
            hits.add_metric([name], m["cache_hits"])
            misses.add_metric([name], m["cache_misses"])
            evicted.add_metric([name], m["cache_evicted_bytes"])
            wal.add_metric([name], stats["wal_bytes"])
            budget.add_metric([name], stats["budget"])
            dirty.add_metric([name], stats["dirty_blocks"] * BLOCK_SIZE)
            size.add_metric([name], stats["size"])
            conns.add_metric([name], stats["connections"])
            cached.add_metric([name], stats["cached_blocks"] * BLOCK_SIZE)
            s = sv.sync_stats.snapshot()
            syncs.add_metric([name, "ok"], s.ok)
            syncs.add_metric([name, "failed"], s.failed)
            sync_dur.add_metric([name], _buckets(s.duration), s.duration.total)
            readthrough.add_metric([name], _buckets(rt := sv.fetcher.batch_duration.snapshot()),
                                   rt.total)
            sync_bytes.add_metric([name], s.bytes)
            if s.last_commit_unix is not None:
                last_commit.add_metric([name], s.last_commit_unix)
            version.add_metric([name], sv.manifest.version)
        yield from (io_req, io_bytes, io_err, io_lat)
        yield from (inflight, wal, budget, dirty, size, conns, cached, hits, misses, evicted,
                    syncs, sync_dur, sync_bytes, last_commit, readthrough, version)
        yield from self._store()
        yield from self._handoff()
        yield from self._snapshots()
        yield from self._replication()

    def _store(self) -> Iterator[Metric]:
        store = self.control.store
        if not isinstance(store, MeteredStore):
            return
        req = CounterMetricFamily("glidefs_store_requests", "object store requests",
                                  labels=["op"])
        err = CounterMetricFamily("glidefs_store_errors", "object store requests that failed",
                                  labels=["op"])
        nbytes = CounterMetricFamily("glidefs_store_bytes", "bytes moved to or from the store",
                                     labels=["op"])
        lat = HistogramMetricFamily("glidefs_store_request_duration_seconds",
                                    "object store request duration", labels=["op"])
        for op, o in store.snapshot().items():
            req.add_metric([op], o.requests)
            err.add_metric([op], o.errors)
            nbytes.add_metric([op], o.bytes)
            lat.add_metric([op], _buckets(o.duration), o.duration.total)
        yield from (req, err, nbytes, lat)

    def _handoff(self) -> Iterator[Metric]:
        # Every result is exported, at zero until it happens, so an alert on
        # aborts exists before the first one. The numbers are inherited from
        # predecessor to successor (glide/handoff/stats.py): they count for
        # the service, not for this process.
        st = self.control.handoff_stats
        total = CounterMetricFamily("glidefs_handoffs", "handoffs by result (succeeded, "
                                    "aborted, dry_run, revived)", labels=["result"])
        counts = dict(st.counts)
        for result in sorted(counts):
            total.add_metric([result], counts[result])
        yield total
        for name, what, hist in (
                ("glidefs_handoff_duration_seconds", "handoff duration, trigger to outcome",
                 st.duration),
                ("glidefs_handoff_stall_seconds", "I/O stall of a handoff: the predecessor's "
                 "first stopped request to the successor's last resumed export", st.stall)):
            h = HistogramMetricFamily(name, what)
            h.add_metric([], _buckets(snap := hist.snapshot()), snap.total)
            yield h


    def _snapshots(self) -> Iterator[Metric]:
        snaps = self.control.snapshots
        total = CounterMetricFamily("glidefs_snapshots", "snapshots this daemon took, by "
                                    "result (committed, failed)", labels=["result"])
        for result, n in sorted(dict(snaps.results).items()):
            total.add_metric([result], n)
        yield total
        yield GaugeMetricFamily("glidefs_snapshots_in_progress",
                                "snapshots being taken (pending)", value=len(snaps.active))
        h = HistogramMetricFamily("glidefs_snapshot_freeze_seconds",
                                  "how long an app-consistent snapshot kept its application "
                                  "frozen: first pre hook to first post hook")
        h.add_metric([], _buckets(snap := snaps.freeze.snapshot()), snap.total)
        yield h

    def _replication(self) -> Iterator[Metric]:
        jobs = list(self.control.replication.jobs.values())
        lag = GaugeMetricFamily("glidefs_replication_lag_seconds",
                                "age of the newest snapshot on the job's target (the recovery "
                                "point)", labels=["job", "volume"])
        nbytes = CounterMetricFamily("glidefs_replication_bytes", "bytes written to the "
                                     "job's target", labels=["job"])
        steps = CounterMetricFamily("glidefs_replication_steps", "replication steps by "
                                    "result (ok, error, cancelled)", labels=["job", "result"])
        pinned = GaugeMetricFamily("glidefs_replication_pinned_snapshots",
                                   "source snapshots the job pins", labels=["job"])
        failed = GaugeMetricFamily("glidefs_replication_job_failed", "1 while the job is "
                                   "stopped by a permanent error", labels=["job"])
        now = time.time()
        for rt in jobs:
            name = rt.cfg.name
            for v in list(rt.volumes.values()):
                if v.newest_target_created is not None:
                    lag.add_metric([name, v.volume], max(0.0, now - v.newest_target_created))
            nbytes.add_metric([name], rt.bytes_sent)
            for result, n in sorted(rt.steps.items()):
                steps.add_metric([name, result], n)
            pinned.add_metric([name], rt.pinned)
            failed.add_metric([name], 1.0 if rt.state == "failed" else 0.0)
        yield from (lag, nbytes, steps, pinned, failed)


class Metrics:
    """The daemon's registry and an async scrape that never blocks the loop."""

    def __init__(self, control: Any) -> None:  # noqa: ANN401
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(control))

    async def scrape(self) -> tuple[bytes, str]:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return body, CONTENT_TYPE_LATEST


def write_gc_textfile(path: str, report: Any, seconds: float, ok: bool) -> None:  # noqa: ANN401
    """`glidefs gc --metrics-file`: the run's outcome for node_exporter's
    textfile collector (a one-shot command has no endpoint to scrape).
    prometheus-client writes it atomically (temp file, rename)."""
    from prometheus_client import Gauge, write_to_textfile

    reg = CollectorRegistry(auto_describe=False)

    def gauge(name: str, text: str, value: float) -> None:
        Gauge(name, text, registry=reg).set(value)

    gauge("glidefs_gc_last_run_timestamp_seconds", "when the last gc run ended", time.time())
    gauge("glidefs_gc_last_run_success", "1 if the last gc run finished", 1 if ok else 0)
    gauge("glidefs_gc_last_run_duration_seconds", "how long the last gc run took", seconds)
    gauge("glidefs_gc_deleted_objects", "objects the last gc run deleted", report.deleted)
    gauge("glidefs_gc_deleted_bytes", "bytes the last gc run deleted", report.deleted_bytes)
    gauge("glidefs_gc_kept_young_objects", "unreachable objects kept for the grace period",
          report.kept_young)
    gauge("glidefs_gc_reachable_objects", "objects some volume root reaches", report.reachable)
    write_to_textfile(path, reg)
