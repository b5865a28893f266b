/* volume.h — one exported volume: WAL + block index + cache file + state file.
 *
 * Lock order: evict_mu -> ckpt_mu -> wal.mu -> evict_rw -> idx_mu -> miss_mu.
 * Writes hold wal.mu across append and index update, so a checkpoint that
 * cuts the WAL under wal.mu sees every record up to its cut in the index.
 * Reads hold idx_mu only while planning (which file, which offset, taking a
 * reference on a WAL segment) and do their I/O unlocked.
 *
 * Invariant 4 (a block served from the cache file is never stale) holds by
 * ordering: the cache file is written only by a checkpoint, only for blocks
 * that are still DIRTY (so no reader looks at the cache file for them), and
 * only after the WAL records being written back are durable; the blocks leave
 * DIRTY only after the cache file's fdatasync. A fetched block is installed
 * only if it is still ABSENT and not DIRTY, under idx_mu, so a fetch never
 * overwrites a newer write; a state file says CLEAN for an installed block
 * only after an fdatasync of the cache file that covers the install.
 * Eviction (CLEAN -> ABSENT, a hole punched) marks blocks ABSENT holding
 * evict_rw exclusively (every read holds it shared from planning to the end
 * of its pread, so no read that planned "cache file" is still reading), makes
 * a state file saying ABSENT durable, and only then punches, under ckpt_mu
 * and idx_mu, the blocks still ABSENT (see evict_commit in evict.c).
 *
 * Read misses: a read that needs an ABSENT+REMOTE block registers a waiter
 * (under idx_mu, so an install cannot slip between the check and the
 * registration), queues the block for the fetcher (once per block) and
 * returns VOLUME_PARKED; the waiter fires when the block is installed or the
 * fetch failed, and the caller re-runs the read.
 */
#ifndef GLIDE_VOLUME_H
#define GLIDE_VOLUME_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "block_index.h"
#include "io_metrics.h"
#include "wal.h"

struct nbd_conn;

#define VOLUME_PARKED 1

/* Fired (from the installer's thread, no volume lock held) when the block a
 * parked read waits for was installed (err 0) or could not be fetched. */
struct miss_waiter {
    void (*done)(struct miss_waiter *w, int err);
    struct miss_waiter *next;
};

struct miss_entry;

struct volume_config {
    const char *dir;
    uint64_t size;       /* bytes, a multiple of the block size */
    uint64_t wal_budget; /* bytes of WAL + index charge before writers wait */
    uint64_t seg_size;   /* target WAL segment size */
    struct io_metrics *io; /* lent, must outlive the volume; NULL: the volume's own */
    int passive;           /* a handoff successor's open: see volume_catch_up */
};

struct volume_stats {
    atomic_ulong reads, writes, flushes, trims, zeroes, read_bytes, write_bytes;
    atomic_ulong backpressure_waits, checkpoints, errors;
};

struct volume {
    char dir[4096];
    /* Only grow (volume_grow): nblocks changes under idx_mu with the index,
     * size after the state file records it. Read without locks elsewhere, so
     * atomic; a range checked against one value stays valid. */
    _Atomic uint64_t size, nblocks;
    uint8_t volume_id[16];
    int cache_fd;
    struct wal wal;
    pthread_cond_t space_cv; /* with wal.mu: writers waiting for budget */
    uint64_t wal_budget;
    int pressure_efd;        /* readable when a checkpoint would help */
    int pressure_signaled;

    pthread_mutex_t idx_mu;
    struct block_index *bi;
    atomic_ulong nversions;

    pthread_mutex_t ckpt_mu; /* one checkpoint or eviction batch at a time: both write the state file */
    uint64_t checkpoint_seq;
    uint64_t manifest_version;
    uint64_t synced_installs; /* (ckpt_mu) value of `installs` covered by the last cache fdatasync */
    uint64_t written_back_seq; /* (ckpt_mu) the cache file holds, synced, each block's newest version <= this */
    int remote_changed;       /* (idx_mu) REMOTE bits changed since the last state snapshot */

    pthread_mutex_t rmw_mu;  /* serialises read-modify-write of partial blocks */
    atomic_int failed;       /* sticky errno after an unrecoverable I/O error */
    atomic_int read_only;    /* writes fail with EROFS (the store fenced this writer) */

    pthread_mutex_t conn_mu;
    pthread_cond_t conn_cv;
    struct nbd_conn *conns;
    int nconns;

    pthread_rwlock_t evict_rw;
    pthread_mutex_t evict_mu; /* one volume_evict_to at a time; guards clock_hand */
    uint64_t clock_hand;      /* next block the CLOCK sweep looks at */

    pthread_mutex_t miss_mu; /* after idx_mu in the lock order */
    struct miss_entry **miss_buckets;
    uint64_t *miss_queue; /* blocks waiting for the fetcher, FIFO ring */
    size_t miss_head, miss_len, miss_cap;
    int miss_efd;          /* readable while miss_queue is not empty */
    atomic_ulong misses, installs, fetch_failures, evictions;

    struct volume_stats st;
    struct io_metrics *io;    /* the request paths count here: cfg->io, or io_own */
    struct io_metrics io_own;
    struct wal_replay_stats replay;

    /* A passive volume (a handoff successor's) replays a WAL another process
     * still appends to and changes nothing on disk until volume_activate:
     * writes, flush, checkpoint, grow fail with EROFS, reads of blocks only
     * the store has with EAGAIN. Other reads are served, as a view for
     * warming up only: a cache-file block may already hold what the
     * predecessor's write-back copied from records not caught up yet.
     * Cleared once, by activation. */
    atomic_int passive;
    uint64_t target_size;    /* the configured size: larger than size until activation grows it */
    uint64_t state_ckpt;     /* the state file read at open: activation refuses one that changed */
    uint64_t state_len;
    uint32_t state_crc;
    atomic_int wb_cancel;    /* volume_cancel_write_back: write-backs stop with ECANCELED */
};

struct checkpoint_stats {
    uint64_t cut_seq, blocks_written, blocks_zeroed, blocks_bypassed, state_bytes;
};

/* A size larger than the state file's is a grow (the blocks added are
 * ABSENT, reading as zeros); a smaller one is refused. */
int volume_open(const struct volume_config *cfg, struct volume **out, char *err, size_t errlen);
void volume_close(struct volume *v);

/* ---- the handoff successor's side (cfg->passive) ----
 * The predecessor keeps appending and rotating segments but promises no
 * checkpoint, eviction, grow or segment retirement until it has stopped. */

/* Replay what was appended since the last call. *records: records applied,
 * *bytes: WAL bytes read. A record still being written is left for the next
 * call. -EINVAL when not passive; -EUCLEAN (err filled) on a foreign segment. */
int volume_catch_up(struct volume *v, uint64_t *records, uint64_t *bytes, char *err, size_t errlen);
/* The predecessor has stopped, fdatasynced its WAL and closed the volume (the
 * caller guarantees it: replayed records count as durable). A last catch-up,
 * then exactly what volume_open would have done at this moment: torn tail cut
 * off, an implicit grow persisted, spares dropped, a new active segment and
 * group commit. -ESTALE (err filled) if the state file changed since the
 * passive open (the predecessor broke its promise); the volume stays passive. */
int volume_activate(struct volume *v, char *err, size_t errlen);

/* A write-back (and a checkpoint's) running now or started later stops
 * within one copy batch with -ECANCELED, until allowed again (cancel 0).
 * What it already copied is harmless: those blocks stay DIRTY and
 * written_back_seq does not move. For the predecessor before a cutover. */
void volume_cancel_write_back(struct volume *v, int cancel);

/* Online grow to new_size bytes (a multiple of the block size, not smaller;
 * equal is a no-op), while I/O, eviction and installs go on. The cache file
 * is extended, the index grows, the state file records the new size durably,
 * and only then do requests beyond the old end pass the range checks. NBD
 * connections keep the size they negotiated. 0 or -errno (-EINVAL: shrink or
 * misaligned; a failed state file write fails the volume, as in a
 * checkpoint). */
int volume_grow(struct volume *v, uint64_t new_size);

/* All return 0 or -errno. Any offset/length is accepted; partial blocks are
 * read-modify-written. *seq receives the WAL sequence to wait on for
 * durability (0 if the call changed nothing). */
int volume_read(struct volume *v, uint64_t off, uint64_t len, void *buf);
/* Like volume_read, but when a block must come from the store it parks `w`
 * and returns VOLUME_PARKED instead of waiting. */
int volume_read_or_park(struct volume *v, uint64_t off, uint64_t len, void *buf, struct miss_waiter *w);
int volume_write(struct volume *v, uint64_t off, uint64_t len, const void *buf, uint64_t *seq);
int volume_trim(struct volume *v, uint64_t off, uint64_t len, uint64_t *seq);
int volume_write_zeroes(struct volume *v, uint64_t off, uint64_t len, int no_hole, uint64_t *seq);
int volume_flush(struct volume *v); /* blocking group-committed flush of everything so far */

/* Block's content as of a WAL sequence number (for the flusher). */
int volume_read_block_as_of(struct volume *v, uint64_t lba, uint64_t seq, void *buf);

/* base:allocation flags (NBD_STATE_HOLE=1, NBD_STATE_ZERO=2) of consecutive
 * extents covering [off, off+len); fn returns nonzero to stop. */
typedef int (*extent_fn)(void *ctx, uint64_t len, uint32_t flags);
int volume_block_status(struct volume *v, uint64_t off, uint64_t len, extent_fn fn, void *ctx);

/* Write back every version <= upto (UINT64_MAX: everything so far) into the
 * cache file, persist the state file, delete the WAL segments it covered. */
/* bypass > 0: the caller committed every block's newest version <= the cut
 * to the store, so blocks a write-back left out of the cache file (runs of at
 * least `bypass` data blocks, this call's own write-back included) become
 * ABSENT. bypass == 0: no such promise; those blocks are copied first. */
int volume_checkpoint(struct volume *v, uint64_t upto, uint32_t bypass, struct checkpoint_stats *st);
/* The first half of a checkpoint on its own: copy each block's newest version
 * <= upto into the cache file and sync it, changing no state. A checkpoint
 * up to the same point then skips straight to dropping versions and writing
 * the state file, so the flusher can overlap the copy with building packs
 * and still checkpoint only after its commit. bypass > 0: runs of at least
 * that many consecutive data blocks are not copied but marked BYPASSED
 * (block_index.h); the caller means to commit the cut before checkpointing. */
int volume_write_back(struct volume *v, uint64_t upto, uint32_t bypass, struct checkpoint_stats *st);

uint64_t volume_charge(struct volume *v); /* current WAL + index charge */

/* ---- the object-store side (fetcher, flusher, eviction) ---- */

/* Mark blocks as present (or not) in the store's committed manifest. */
void volume_set_remote(struct volume *v, uint64_t lba, uint64_t n, int on);
/* From now on every write, TRIM and WRITE_ZEROES fails with EROFS, including
 * those waiting on the WAL budget: nothing will ever free it (fencing). */
void volume_set_read_only(struct volume *v);
/* Changes the WAL budget; writers waiting for space re-check at once. A
 * handoff raises it while syncing is paused (nothing frees space then), so
 * a writer at the budget is not stuck mid-request when the freeze comes. */
void volume_set_wal_budget(struct volume *v, uint64_t budget);
/* Up to max blocks the fetcher should get; 0 when none are waiting. */
size_t volume_take_misses(struct volume *v, uint64_t *out, size_t max);
/* A fetched, verified block: stored unless a write overtook it; parked reads
 * re-run either way. */
int volume_install(struct volume *v, uint64_t lba, const void *data);
/* The block could not be fetched: parked reads fail with err. */
void volume_fail_miss(struct volume *v, uint64_t lba, int err);
/* CLEAN blocks that the store holds become ABSENT (hole punched); returns how
 * many were evicted. Never touches DIRTY blocks or blocks only local. The
 * state file says ABSENT before any hole is punched, so a crash in between
 * leaves blocks to refetch, never a hole that reads as data. */
int volume_evict(struct volume *v, uint64_t lba, uint64_t n, uint64_t *evicted);
/* CLOCK: while more than max_cached blocks have a CLEAN base, sweep the hand
 * (persistent across calls), giving referenced blocks a second chance and
 * evicting unreferenced CLEAN+REMOTE non-DIRTY ones in batches (one state
 * file write each). Stops at the target or after two full sweeps. */
int volume_evict_to(struct volume *v, uint64_t max_cached, uint64_t *evicted);
/* Seal the WAL and return the cut for a flush (everything <= cut is in the
 * index); the flusher then lists and reads the dirty blocks as of it. */
int volume_flush_cut(struct volume *v, uint64_t *cut);
typedef int (*dirty_fn)(void *ctx, uint64_t lba, uint8_t kind);
int volume_dirty_upto(struct volume *v, uint64_t cut, dirty_fn fn, void *ctx);
/* Blocks held only locally (CLEAN, not REMOTE, not DIRTY): data written before
 * the volume had a store, which the first flush must adopt. */
int volume_local_only(struct volume *v, dirty_fn fn, void *ctx);

/* n consecutive blocks from lba as of seq, as volume_read_block_as_of reads one. */
int volume_read_blocks_as_of(struct volume *v, uint64_t lba, uint64_t n, uint64_t seq, void *buf);

#endif
