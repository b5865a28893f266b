/* io_metrics.h — per-volume I/O counters kept by the C request paths (NBD
 * connections, ublk queues, the Python-called Volume methods) and read by
 * Volume.metrics() at scrape time: no Python runs per request.
 *
 * Per op (read, write, flush, trim, write_zeroes): bytes, errors, a latency
 * histogram with fixed upper bounds and the latency sum; requests are the
 * sum of the histogram's buckets, so the two always agree. Plus the requests
 * in flight and the cache's hits, misses and evicted bytes. Latency runs from the request parsed to its reply queued (for
 * FLUSH and FUA, until the group commit has covered it; for a read parked
 * on the store, until it was re-run and answered).
 *
 * Cost per request: one clock_gettime(CLOCK_MONOTONIC) at the start and one
 * at the end, and five relaxed atomic adds (inflight twice, a bucket, the
 * sum, the bytes). Counters only grow.
 *
 * The binding owns the struct and lends it to the volume (volume_config.io),
 * so a Python call that returns after a concurrent close, and metrics() read
 * after close, never touch a freed volume.
 */
#ifndef GLIDE_IO_METRICS_H
#define GLIDE_IO_METRICS_H

#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

enum io_op { IO_READ, IO_WRITE, IO_FLUSH, IO_TRIM, IO_WRITE_ZEROES, IO_NOPS, IO_UNCOUNTED = -1 };

#define IO_LAT_BOUNDS 12
/* Upper bounds (inclusive, as Prometheus's `le`) in nanoseconds; the bucket
 * after the last is +Inf. Few buckets keep a scrape of many volumes small. */
static const uint64_t io_lat_bounds_ns[IO_LAT_BOUNDS] = {
    10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 10000000, 50000000, 250000000, 1000000000,
};

struct io_op_counters {
    atomic_ulong buckets[IO_LAT_BOUNDS + 1];
    atomic_ulong bytes, errors, sum_ns;
};

struct io_metrics {
    struct io_op_counters op[IO_NOPS];
    atomic_long inflight;
    atomic_ulong cache_hits;    /* blocks guest reads got from the cache file or the WAL */
    atomic_ulong cache_misses;  /* blocks queued for the store */
    atomic_ulong evicted_bytes;
};

static inline uint64_t io_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A request of this op starts: returns its start time (0 when not counted). */
static inline uint64_t io_begin(struct io_metrics *m, int op) {
    if (op < 0) return 0;
    atomic_fetch_add_explicit(&m->inflight, 1, memory_order_relaxed);
    return io_now_ns();
}

/* Its reply is queued: bytes count only when it succeeded. */
static inline void io_end(struct io_metrics *m, int op, uint64_t t0, uint64_t bytes, int failed) {
    if (op < 0) return;
    uint64_t now = io_now_ns(), lat = now > t0 ? now - t0 : 0;
    struct io_op_counters *c = &m->op[op];
    int b = 0;
    while (b < IO_LAT_BOUNDS && lat > io_lat_bounds_ns[b]) b++;
    atomic_fetch_add_explicit(&c->buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->sum_ns, lat, memory_order_relaxed);
    if (failed) atomic_fetch_add_explicit(&c->errors, 1, memory_order_relaxed);
    else if (bytes) atomic_fetch_add_explicit(&c->bytes, bytes, memory_order_relaxed);
    atomic_fetch_sub_explicit(&m->inflight, 1, memory_order_relaxed);
}

#endif
