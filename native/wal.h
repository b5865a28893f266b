/* wal.h — the write-ahead log of one volume: append-only segment files.
 *
 * Invariants kept here:
 *  - records are appended in sequence order under `mu`; a record's bytes are in
 *    the file (page cache) before its sequence number is visible to anyone;
 *  - `synced_seq` only grows, and only after an fdatasync of every segment that
 *    held unsynced records up to it (group commit: one fdatasync serves every
 *    waiter whose target it covers);
 *  - a segment is deleted (or kept for reuse) only by wal_retire_upto, after
 *    the caller has made everything in it durable elsewhere (checkpoint), and
 *    its fd stays open until the last reader drops its reference;
 *  - a reused ("recycled") segment file still holds old records after its new
 *    tail; they can never be replayed because their sequence numbers are all
 *    older than the one replay expects next;
 *  - replay accepts records only in unbroken sequence order with valid
 *    checksums and stops at the first that is not (invariant 3);
 *  - a passive WAL (a handoff successor following another process's appends)
 *    writes nothing to the directory until wal_activate.
 */
#ifndef GLIDE_WAL_H
#define GLIDE_WAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "wal_record.h"

#define WAL_RECYCLE_MAX 4

struct wal_segment {
    int fd;
    uint64_t id;
    uint64_t start_seq;
    uint64_t end_seq; /* last record's seq; start_seq - 1 when empty */
    uint64_t size;    /* bytes in use, header included */
    int needs_sync;
    atomic_int refs;  /* 1 owner reference while live + 1 per reader */
    struct wal_segment *next;
    char path[4096 + 32];
};

/* Called once per valid record beyond `checkpoint_seq` during replay, in order. */
typedef int (*wal_replay_fn)(void *ctx, const struct wal_record *r, struct wal_segment *seg, uint64_t data_off);

struct wal_replay_stats {
    uint64_t records, applied, bytes, discarded_bytes, segments;
    uint64_t last_seq;
};

struct wal_waiter {
    uint64_t target;
    void (*done)(struct wal_waiter *w, int err);
    struct wal_waiter *next;
};

struct wal {
    char dir[4096];
    int dir_fd;
    uint8_t volume_id[16];
    uint64_t seg_size;

    pthread_mutex_t mu; /* appends, the segment list, next_seq */
    struct wal_segment *head, *tail; /* oldest .. active */
    uint64_t next_seq;
    uint64_t next_seg_id;
    uint64_t live_bytes;
    /* Retired segment files kept for reuse: appending into pages that are
     * already allocated (and usually cached) is much cheaper than growing a
     * new file, both for the copy and for fdatasync. */
    char free_paths[WAL_RECYCLE_MAX][4096 + 32];
    int nfree;

    pthread_mutex_t sync_mu; /* group commit state */
    pthread_cond_t sync_cv;
    struct wal_waiter *waiters;
    uint64_t synced_seq;
    int sync_error; /* sticky: after a failed fdatasync nothing is acknowledged again */
    int stopping;
    pthread_t sync_thread;
    int sync_started;
    atomic_ulong syncs;

    /* Replay position, kept after open for a passive WAL (another process
     * appends; we follow): `tail` is the segment being read, its `size` the
     * end of the last valid record; `expect` the next sequence accepted (0:
     * none seen yet, take the first segment's start). Under `mu`. */
    int passive;
    uint64_t expect;
    uint64_t checkpoint_seq;
    wal_replay_fn replay_fn;
    void *replay_ctx;
};

struct wal_append_result {
    uint64_t seq;
    struct wal_segment *seg;
    uint64_t data_off; /* offset of the record's data in seg */
};


/* Open (replaying) or create the WAL in `dir`. Returns 0 or -errno; on a gap in
 * the log (records known to be missing) returns -EUCLEAN and fills errmsg. */
int wal_open(struct wal *w, const char *dir, const uint8_t volume_id[16], uint64_t seg_size,
             uint64_t checkpoint_seq, wal_replay_fn fn, void *ctx, struct wal_replay_stats *st,
             char *errmsg, size_t errlen);
void wal_close(struct wal *w);

/* Passive open for a handoff successor while the predecessor still appends
 * (with checkpoints and retirement suspended): replays like wal_open but
 * changes nothing on disk (no truncation, no deletion, no spare removal, no
 * active segment, no sync thread) and remembers where it stopped. */
int wal_open_passive(struct wal *w, const char *dir, const uint8_t volume_id[16], uint64_t seg_size,
                     uint64_t checkpoint_seq, wal_replay_fn fn, void *ctx, struct wal_replay_stats *st,
                     char *errmsg, size_t errlen);
/* Passive only: replay what was appended since, from the remembered position
 * into later segments. A record or segment header still being written is
 * "not yet", never an error. Adds to *st. */
int wal_catch_up(struct wal *w, struct wal_replay_stats *st, char *errmsg, size_t errlen);
/* Passive only, once the writer has stopped and made its WAL durable: a last
 * catch-up that treats a torn or broken tail exactly as wal_open does
 * (truncate, delete after a break), then drop spares, create the active
 * segment and start group commit. Afterwards the WAL is as wal_open leaves it. */
int wal_activate(struct wal *w, struct wal_replay_stats *st, char *errmsg, size_t errlen);

/* Caller holds w->mu. Appends one record; data is NULL for zero kinds. */
int wal_append_locked(struct wal *w, uint8_t kind, uint64_t lba, uint32_t nblocks, const void *data,
                      struct wal_append_result *out);

/* Caller holds w->mu. Seals the active segment if it holds records, so that
 * every record <= the returned seq lives in a non-active segment. */
int wal_cut_locked(struct wal *w, uint64_t *cut);

/* Durability. wal_sync_wait blocks; wal_sync_async calls waiter->done from the
 * sync thread (never with a lock of the caller held). */
int wal_sync_wait(struct wal *w, uint64_t target);
void wal_sync_async(struct wal *w, struct wal_waiter *waiter);
uint64_t wal_last_seq(struct wal *w);

/* Delete segments whose records are all <= seq (never the active one). */
void wal_retire_upto(struct wal *w, uint64_t seq);

static inline void wal_segment_get(struct wal_segment *s) { atomic_fetch_add(&s->refs, 1); }
void wal_segment_put(struct wal_segment *s);

#endif
