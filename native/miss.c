/* miss.c — read-through: reads that need a block only the store has park
 * here until the fetcher installs it or gives up (see volume.h, "Read
 * misses").
 *
 * Invariants: a block is queued for the fetcher at most once while it waits
 * (the bucket table says which are waiting); a waiter is registered under
 * idx_mu together with the check that found the block missing, and install
 * stores under idx_mu, so an install can never slip between the two and leave
 * a read parked forever; every entry is resolved exactly once (install,
 * fail_miss or close), which fires all its waiters with no volume lock held.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "glide_common.h"
#include "volume_internal.h"

static struct miss_entry **miss_bucket(struct volume *v, uint64_t lba) {
    return &v->miss_buckets[(lba * 0x9E3779B97F4A7C15ULL) >> 52 & (MISS_BUCKETS - 1)];
}

/* Queue lba for the fetcher unless it is already waiting; park w on it if
 * given. -ENOMEM leaves nothing half-registered. */
int miss_register(struct volume *v, uint64_t lba, struct miss_waiter *w) {
    int rc = 0;
    pthread_mutex_lock(&v->miss_mu);
    struct miss_entry **b = miss_bucket(v, lba), *e = *b;
    while (e && e->lba != lba) e = e->next;
    if (!e) {
        if (v->miss_len == v->miss_cap) {
            size_t nc = v->miss_cap ? v->miss_cap * 2 : 256;
            uint64_t *nq = malloc(nc * sizeof *nq);
            if (!nq) { rc = -ENOMEM; goto out; }
            for (size_t i = 0; i < v->miss_len; i++) nq[i] = v->miss_queue[(v->miss_head + i) % v->miss_cap];
            free(v->miss_queue);
            v->miss_queue = nq;
            v->miss_cap = nc;
            v->miss_head = 0;
        }
        e = calloc(1, sizeof *e);
        if (!e) { rc = -ENOMEM; goto out; }
        e->lba = lba;
        e->next = *b;
        *b = e;
        v->miss_queue[(v->miss_head + v->miss_len++) % v->miss_cap] = lba;
        atomic_fetch_add(&v->misses, 1);
        atomic_fetch_add_explicit(&v->io->cache_misses, 1, memory_order_relaxed);
        uint64_t one = 1;
        ssize_t n = write(v->miss_efd, &one, sizeof one);
        (void)n;
    }
    if (w) { w->next = e->waiters; e->waiters = w; }
out:
    pthread_mutex_unlock(&v->miss_mu);
    return rc;
}

struct miss_waiter *miss_resolve(struct volume *v, uint64_t lba) {
    pthread_mutex_lock(&v->miss_mu);
    struct miss_entry **b = miss_bucket(v, lba);
    while (*b && (*b)->lba != lba) b = &(*b)->next;
    struct miss_waiter *ws = NULL;
    if (*b) {
        struct miss_entry *e = *b;
        *b = e->next;
        ws = e->waiters;
        free(e);
    }
    pthread_mutex_unlock(&v->miss_mu);
    return ws;
}

void miss_fire(struct miss_waiter *ws, int err) {
    while (ws) {
        struct miss_waiter *nx = ws->next;
        ws->done(ws, err);
        ws = nx;
    }
}


size_t volume_take_misses(struct volume *v, uint64_t *out, size_t max) {
    pthread_mutex_lock(&v->miss_mu);
    size_t n = 0;
    while (n < max && v->miss_len) {
        out[n++] = v->miss_queue[v->miss_head];
        v->miss_head = (v->miss_head + 1) % v->miss_cap;
        v->miss_len--;
    }
    if (!v->miss_len) {
        uint64_t cnt;
        ssize_t r = read(v->miss_efd, &cnt, sizeof cnt); /* drained: not readable */
        (void)r;
    }
    pthread_mutex_unlock(&v->miss_mu);
    return n;
}

int volume_install(struct volume *v, uint64_t lba, const void *data) {
    if (lba >= v->nblocks) return -EINVAL;
    int rc = 0;
    pthread_mutex_lock(&v->idx_mu);
    uint8_t st = block_index_state(v->bi, lba);
    /* Only an ABSENT block the store holds and nobody wrote since: a write
     * that overtook the fetch wins, and the parked reads will see it. The
     * pwrite happens under idx_mu so a checkpoint cannot interleave. */
    if (!(st & BLOCK_DIRTY) && (st & BLOCK_BASE_MASK) == BLOCK_ABSENT && (st & BLOCK_REMOTE)) {
        rc = pwrite_full(v->cache_fd, data, GLIDE_BLOCK_SIZE, lba * GLIDE_BLOCK_SIZE);
        if (!rc) {
            block_index_set_base(v->bi, lba, BLOCK_CLEAN);
            block_index_set_referenced(v->bi, lba, 1); /* a read is waiting for it */
            /* counted under idx_mu: a state snapshot taken under idx_mu knows
             * exactly which installs it may record as CLEAN (sync_installs) */
            atomic_fetch_add(&v->installs, 1);
        }
    }
    pthread_mutex_unlock(&v->idx_mu);
    miss_fire(miss_resolve(v, lba), rc ? -rc : 0);
    return rc;
}

void volume_fail_miss(struct volume *v, uint64_t lba, int err) {
    atomic_fetch_add(&v->fetch_failures, 1);
    miss_fire(miss_resolve(v, lba), err ? err : EIO);
}

void miss_table_free(struct volume *v) {
    if (!v->miss_buckets) return;
    /* parked reads are gone with their connections; fail any stragglers */
    for (unsigned i = 0; i < MISS_BUCKETS; i++) {
        while (v->miss_buckets[i]) {
            struct miss_entry *e = v->miss_buckets[i];
            v->miss_buckets[i] = e->next;
            miss_fire(e->waiters, ESHUTDOWN);
            free(e);
        }
    }
    free(v->miss_buckets);
    free(v->miss_queue);
}
