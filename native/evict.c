/* evict.c — eviction: CLEAN blocks the store holds become ABSENT and their
 * cache-file bytes are punched (volume_evict, and the CLOCK sweep of
 * volume_evict_to).
 *
 * Invariant 4 across a crash: a state file never says CLEAN over a hole. The
 * order inside a batch that keeps it is described at evict_commit. Never
 * touched: DIRTY blocks and blocks only this cache holds (not REMOTE).
 * Locks: evict_mu (one sweep at a time, owns clock_hand, and keeps
 * volume_grow out while a sweep is sized by nblocks) -> ckpt_mu (the
 * whole batch) -> evict_rw (exclusive, to drain reads) -> idx_mu.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>

#include "crash_point.h"
#include "glide_common.h"
#include "volume_internal.h"

#define EVICT_BATCH 4096u    /* blocks per state file write: bounds lock holds, amortizes the fsyncs */
#define EVICT_SCAN (1u << 16) /* state bytes looked at per idx_mu hold while choosing */

static int evictable(uint8_t st) {
    return !(st & BLOCK_DIRTY) && (st & BLOCK_BASE_MASK) == BLOCK_CLEAN && (st & BLOCK_REMOTE);
}

/* Punch one run of blocks: one syscall, errors reported but harmless (the
 * blocks are ABSENT either way and will be refetched). */
static int punch(struct volume *v, uint64_t lba, uint64_t n) {
    if (fallocate(v->cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(lba * GLIDE_BLOCK_SIZE),
                  (off_t)(n * GLIDE_BLOCK_SIZE)) < 0)
        return -errno;
    return 0;
}

/* Evict those of lbas[0..n) (ascending) that are still evictable (and, with
 * skip_referenced, not referenced since they were chosen). Caller holds
 * ckpt_mu for the whole call.
 *
 * Crash ordering (invariant 4). A state file that says CLEAN over a hole is
 * the one thing that must never exist: a restarted volume would trust it and
 * serve the hole as zeros. So:
 *   1. under evict_rw (exclusive) and idx_mu, the blocks become ABSENT in
 *      memory; the exclusive lock waits out every read that planned "cache
 *      file" for them, and every later read parks as a miss instead;
 *   2. still under idx_mu, the runs of the state file are encoded from the
 *      index, so they say ABSENT for these blocks (and CLEAN for any block
 *      installed so far, whose bytes sync_installs makes durable first);
 *   3. the state file is replaced atomically and durably (write_state_file);
 *   4. only then are the holes punched.
 * A crash before 3 completes leaves the old state file (CLEAN) over intact
 * bytes; a crash after it leaves ABSENT blocks whose bytes may or may not be
 * punched yet: either way they are refetched, never read as a hole.
 *
 * Why ckpt_mu across all four steps: a checkpoint also writes the state file,
 * from a snapshot it takes under idx_mu; interleaved with steps 1-3 it could
 * write its older snapshot (CLEAN) after ours (ABSENT) and step 4 would then
 * punch under a CLEAN state file. Holding ckpt_mu until step 4 is done also
 * keeps a checkpoint's write-back from putting a block written after step 1
 * into the cache file before we punch it.
 *
 * Between 1 and 4 a read may miss on a block and the fetcher install it
 * again (CLEAN, fresh bytes). The punch therefore re-checks each block under
 * idx_mu, which install also holds for its pwrite, and skips blocks that are
 * no longer ABSENT. A block written meanwhile (DIRTY, base ABSENT) is punched:
 * its data is in the WAL and its base still says the cache file holds nothing. */
static int evict_commit(struct volume *v, uint64_t *lbas, size_t n, int skip_referenced, uint64_t *evicted) {
    int rc = atomic_load(&v->failed);
    if (rc) return -rc;
    struct state_image img = {0};
    uint64_t installs = 0;
    size_t k = 0;
    pthread_rwlock_wrlock(&v->evict_rw);
    pthread_mutex_lock(&v->idx_mu);
    for (size_t i = 0; i < n; i++) {
        uint8_t st = block_index_state(v->bi, lbas[i]);
        if (!evictable(st) || (skip_referenced && (st & BLOCK_REFERENCED))) continue;
        block_index_set_base(v->bi, lbas[i], BLOCK_ABSENT);
        lbas[k++] = lbas[i];
    }
    pthread_rwlock_unlock(&v->evict_rw); /* the drain is done; reads of ABSENT blocks park */
    if (k) {
        rc = encode_state(v, &img);
        installs = atomic_load(&v->installs);
        if (!rc) v->remote_changed = 0;
    }
    pthread_mutex_unlock(&v->idx_mu);
    if (!k) return 0;
    if (!rc) rc = sync_installs(v, installs);
    if (!rc) rc = write_state_file(v, &img, v->checkpoint_seq, NULL);
    else free(img.buf);
    if (rc) {
        /* Nothing punched, and the state file on disk says CLEAN (or, if only
         * the directory fsync failed, ABSENT: harmless): the bytes are intact,
         * so blocks still ABSENT can be CLEAN again. */
        pthread_mutex_lock(&v->idx_mu);
        for (size_t i = 0; i < k; i++)
            if ((block_index_state(v->bi, lbas[i]) & BLOCK_BASE_MASK) == BLOCK_ABSENT)
                block_index_set_base(v->bi, lbas[i], BLOCK_CLEAN);
        v->remote_changed = 1; /* the snapshot that cleared it never reached the disk */
        pthread_mutex_unlock(&v->idx_mu);
        return rc;
    }
    crash_point("evict-after-state");

    int prc = 0;
    for (size_t i = 0; i < k;) {
        pthread_mutex_lock(&v->idx_mu);
        if ((block_index_state(v->bi, lbas[i]) & BLOCK_BASE_MASK) != BLOCK_ABSENT) {
            pthread_mutex_unlock(&v->idx_mu);
            i++; /* installed again meanwhile: those bytes are live */
            continue;
        }
        size_t j = i + 1;
        while (j < k && lbas[j] == lbas[j - 1] + 1 &&
               (block_index_state(v->bi, lbas[j]) & BLOCK_BASE_MASK) == BLOCK_ABSENT)
            j++;
        int r = punch(v, lbas[i], j - i);
        pthread_mutex_unlock(&v->idx_mu);
        if (r && !prc) prc = r;
        i = j;
    }
    *evicted += k;
    atomic_fetch_add(&v->evictions, k);
    atomic_fetch_add_explicit(&v->io->evicted_bytes, (unsigned long)k * GLIDE_BLOCK_SIZE, memory_order_relaxed);
    return prc;
}

int volume_evict(struct volume *v, uint64_t lba, uint64_t n, uint64_t *evicted) {
    *evicted = 0;
    if (lba >= v->nblocks) return -EINVAL;
    if (n > v->nblocks - lba) n = v->nblocks - lba;
    uint64_t *cand = malloc(EVICT_BATCH * sizeof *cand);
    if (!cand) return -ENOMEM;
    uint64_t pos = lba, end = lba + n;
    int rc = 0;
    while (!rc && pos < end) {
        size_t k = 0;
        while (pos < end && k < EVICT_BATCH) {
            pthread_mutex_lock(&v->idx_mu);
            const uint8_t *st = block_index_states(v->bi);
            for (uint64_t stop = pos + EVICT_SCAN < end ? pos + EVICT_SCAN : end; pos < stop && k < EVICT_BATCH;
                 pos++)
                if (evictable(st[pos])) cand[k++] = pos;
            pthread_mutex_unlock(&v->idx_mu);
        }
        if (!k) break;
        pthread_mutex_lock(&v->ckpt_mu);
        rc = evict_commit(v, cand, k, 0, evicted);
        pthread_mutex_unlock(&v->ckpt_mu);
    }
    free(cand);
    return rc;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* What counts toward the cache size is every block whose base is CLEAN, i.e.
 * whose bytes sit in the cache file, DIRTY or not: a dirty block's older base
 * still occupies its 4 KiB until the next checkpoint overwrites it, and it
 * cannot be evicted before a flush makes it CLEAN+REMOTE. Dirty blocks whose
 * base is not CLEAN live only in the WAL (bounded by the WAL budget) and
 * start to count when a checkpoint writes them back. */
int volume_evict_to(struct volume *v, uint64_t max_cached, uint64_t *evicted) {
    *evicted = 0;
    uint64_t *cand = malloc(EVICT_BATCH * sizeof *cand);
    if (!cand) return -ENOMEM;
    pthread_mutex_lock(&v->evict_mu);
    /* Two full turns of the hand: the first clears every referenced bit it
     * passes, so the second finds everything evictable that nobody read in
     * between. Bounding the travel is what ends a call that cannot reach the
     * target because the rest is dirty or held only locally. */
    const uint64_t nb = v->nblocks; /* fixed while evict_mu is held (volume_grow takes it) */
    const uint64_t limit = 2 * nb;
    uint64_t travel = 0;
    int rc = 0;
    while (!rc && travel < limit) {
        size_t k = 0;
        int done = 0;
        while (!done && travel < limit) {
            pthread_mutex_lock(&v->idx_mu);
            uint64_t cached = block_index_cached_count(v->bi);
            uint64_t want = cached > max_cached ? cached - max_cached : 0;
            if (want > EVICT_BATCH) want = EVICT_BATCH;
            if (k >= want) { done = 1; pthread_mutex_unlock(&v->idx_mu); break; }
            const uint8_t *st = block_index_states(v->bi);
            uint64_t h = v->clock_hand;
            for (uint32_t scanned = 0; scanned < EVICT_SCAN && travel < limit && k < want; scanned++) {
                uint8_t s = st[h];
                if (s & BLOCK_REFERENCED) block_index_set_referenced(v->bi, h, 0); /* second chance */
                else if (evictable(s)) cand[k++] = h;
                h = h + 1 == nb ? 0 : h + 1;
                travel++;
            }
            v->clock_hand = h;
            pthread_mutex_unlock(&v->idx_mu);
        }
        if (!k) break;
        qsort(cand, k, sizeof *cand, cmp_u64); /* the hand may have wrapped; runs coalesce when sorted */
        pthread_mutex_lock(&v->ckpt_mu);
        rc = evict_commit(v, cand, k, 1, evicted);
        pthread_mutex_unlock(&v->ckpt_mu);
    }
    pthread_mutex_unlock(&v->evict_mu);
    free(cand);
    return rc;
}
