/* volume.c — open/close and the read/write paths of one volume (see volume.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crash_point.h"
#include "glide_common.h"
#include "volume_internal.h"

/* Index memory is charged against the WAL budget so that zero-range records
 * (a few bytes of WAL, many index entries) cannot grow memory without limit. */
#define VERSION_CHARGE 64u
#define PLAN_CHUNK 64

/* ---------- small I/O helpers ---------- */

int pread_full(int fd, void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) { memset((char *)buf + done, 0, len - done); return 0; } /* sparse tail */
        done += (size_t)n;
    }
    return 0;
}

int pwrite_full(int fd, const void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        done += (size_t)n;
    }
    return 0;
}

void set_failed(struct volume *v, int err) {
    int zero = 0;
    atomic_compare_exchange_strong(&v->failed, &zero, err);
}

/* ---------- open / close ---------- */

static int replay_apply(void *ctx, const struct wal_record *r, struct wal_segment *seg, uint64_t data_off);

/* The cache file at target_size, then an implicit grow recorded before any
 * replay, as volume_grow would: at open, and at a passive volume's activation. */
static int size_and_grow(struct volume *v, uint64_t ckpt, int grow, char *err, size_t errlen) {
    struct stat sb;
    if (fstat(v->cache_fd, &sb) < 0) return -errno;
    if ((uint64_t)sb.st_size != v->target_size && ftruncate(v->cache_fd, (off_t)v->target_size) < 0) {
        int rc = -errno;
        snprintf(err, errlen, "cannot size cache file %s/cache: %s", v->dir, strerror(errno));
        return rc;
    }
    if (!grow) return 0;
    int rc = persist_state_locked(v, ckpt, NULL);
    if (rc) snprintf(err, errlen, "cannot write state file in %s: %s", v->dir, strerror(-rc));
    return rc;
}

int volume_open(const struct volume_config *cfg, struct volume **out, char *err, size_t errlen) {
    err[0] = 0;
    if (cfg->size == 0 || cfg->size % GLIDE_BLOCK_SIZE) {
        snprintf(err, errlen, "volume size %llu is not a positive multiple of %u",
                 (unsigned long long)cfg->size, GLIDE_BLOCK_SIZE);
        return -EINVAL;
    }
    struct volume *v = calloc(1, sizeof *v);
    if (!v) return -ENOMEM;
    snprintf(v->dir, sizeof v->dir, "%s", cfg->dir);
    v->size = cfg->size;
    v->nblocks = cfg->size / GLIDE_BLOCK_SIZE;
    v->wal_budget = cfg->wal_budget;
    v->io = cfg->io ? cfg->io : &v->io_own;
    v->cache_fd = -1;
    v->pressure_efd = -1;
    v->wal.dir_fd = -1;
    pthread_mutex_init(&v->idx_mu, NULL);
    pthread_mutex_init(&v->ckpt_mu, NULL);
    pthread_mutex_init(&v->rmw_mu, NULL);
    pthread_mutex_init(&v->conn_mu, NULL);
    pthread_cond_init(&v->conn_cv, NULL);
    pthread_cond_init(&v->space_cv, NULL);
    /* Writer-preferring: with glibc's default (readers first) a steady stream
     * of reads could keep eviction from ever getting the lock. No reader takes
     * evict_rw twice, so the non-recursive kind is safe. */
    pthread_rwlockattr_t rwa;
    pthread_rwlockattr_init(&rwa);
    pthread_rwlockattr_setkind_np(&rwa, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&v->evict_rw, &rwa);
    pthread_rwlockattr_destroy(&rwa);
    pthread_mutex_init(&v->evict_mu, NULL);
    pthread_mutex_init(&v->miss_mu, NULL);
    v->miss_efd = -1;
    int rc;
    v->miss_buckets = calloc(MISS_BUCKETS, sizeof *v->miss_buckets);
    if (!v->miss_buckets) { rc = -ENOMEM; goto fail; }
    v->bi = block_index_create(v->nblocks);
    if (!v->bi) { rc = -ENOMEM; goto fail; }
    const int passive = cfg->passive;
    if (!passive && mkdir(v->dir, 0700) < 0 && errno != EEXIST) {
        rc = -errno;
        snprintf(err, errlen, "cannot create %s: %s", v->dir, strerror(errno));
        goto fail;
    }
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/cache", v->dir);
    v->cache_fd = open(path, O_RDWR | O_CLOEXEC | (passive ? 0 : O_CREAT), 0600);
    if (v->cache_fd < 0) { rc = -errno; snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno)); goto fail; }

    uint64_t ckpt = 0, file_nblocks = v->nblocks;
    rc = read_state_file(v, &ckpt, &file_nblocks, err, errlen);
    if (rc == -ENOENT && passive) {
        snprintf(err, errlen, "passive open of %s: no state file (only an existing volume can be taken over)", v->dir);
        goto fail;
    } else if (rc == -ENOENT) {
        /* A new volume. The state file is written before any WAL exists, so a
         * WAL without a state file never happens. */
        if (getrandom(v->volume_id, sizeof v->volume_id, 0) != sizeof v->volume_id) { rc = -EIO; goto fail; }
        struct state_image img;
        rc = encode_state(v, &img); /* all ABSENT: one run */
        if (!rc) rc = write_state_file(v, &img, 0, NULL);
        if (rc) { snprintf(err, errlen, "cannot write state file in %s: %s", v->dir, strerror(-rc)); goto fail; }
    } else if (rc) {
        if (!err[0]) snprintf(err, errlen, "cannot read state file in %s: %s", v->dir, strerror(-rc));
        goto fail;
    }
    /* Sized only once the state file agreed: a configuration that is too
     * small must not cut off cached blocks a state file says are CLEAN. A
     * file longer than the size holds only blocks past the end of every
     * state file (a grow that never reached its state file). */
    v->target_size = v->size;
    if (passive) {
        /* Nothing on disk changes before activation: the cache file keeps its
         * size and a grow waits (the WAL lies within the old size). */
        v->size = file_nblocks * GLIDE_BLOCK_SIZE;
    } else {
        rc = size_and_grow(v, ckpt, file_nblocks < v->nblocks, err, errlen);
        if (rc) goto fail;
    }
    v->checkpoint_seq = ckpt;
    v->written_back_seq = ckpt;

    snprintf(path, sizeof path, "%s/wal", v->dir);
    rc = (passive ? wal_open_passive : wal_open)(&v->wal, path, v->volume_id, cfg->seg_size, ckpt, replay_apply,
                                                 v, &v->replay, err, errlen);
    if (rc) {
        if (!err[0]) snprintf(err, errlen, "cannot open WAL in %s: %s", path, strerror(-rc));
        goto fail;
    }
    v->pressure_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (v->pressure_efd < 0) { rc = -errno; goto fail; }
    v->miss_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (v->miss_efd < 0) { rc = -errno; goto fail; }
    atomic_store(&v->passive, passive);
    *out = v;
    return 0;
fail:
    volume_close(v);
    return rc;
}

int volume_catch_up(struct volume *v, uint64_t *records, uint64_t *bytes, char *err, size_t errlen) {
    err[0] = 0;
    /* ckpt_mu: one catch-up or activation at a time, and a stable v->replay */
    pthread_mutex_lock(&v->ckpt_mu);
    uint64_t r0 = v->replay.applied, b0 = v->replay.bytes;
    int rc = atomic_load(&v->passive) ? wal_catch_up(&v->wal, &v->replay, err, errlen) : -EINVAL;
    *records = v->replay.applied - r0;
    *bytes = v->replay.bytes - b0;
    pthread_mutex_unlock(&v->ckpt_mu);
    return rc;
}

int volume_activate(struct volume *v, char *err, size_t errlen) {
    err[0] = 0;
    pthread_mutex_lock(&v->evict_mu);
    pthread_mutex_lock(&v->ckpt_mu);
    int rc = -EINVAL;
    if (!atomic_load(&v->passive)) { snprintf(err, errlen, "volume %s is not passive", v->dir); goto out; }
    rc = state_file_unchanged(v, err, errlen);
    if (rc) goto out;
    /* From here on, what volume_open does, in its order: size the cache file,
     * persist an implicit grow, replay (the last tail) and start the WAL. */
    rc = size_and_grow(v, v->checkpoint_seq, v->target_size > v->size, err, errlen);
    if (rc) goto out;
    v->size = v->target_size;
    rc = wal_activate(&v->wal, &v->replay, err, errlen);
    if (rc) {
        if (!err[0]) snprintf(err, errlen, "cannot activate the WAL in %s: %s", v->dir, strerror(-rc));
        goto out;
    }
    atomic_store(&v->passive, 0);
out:
    pthread_mutex_unlock(&v->ckpt_mu);
    pthread_mutex_unlock(&v->evict_mu);
    return rc;
}

void volume_cancel_write_back(struct volume *v, int cancel) {
    atomic_store(&v->wb_cancel, cancel);
}

int volume_grow(struct volume *v, uint64_t new_size) {
    if (new_size % GLIDE_BLOCK_SIZE) return -EINVAL;
    if (atomic_load(&v->passive)) return -EROFS;
    int rc = atomic_load(&v->failed);
    if (rc) return -rc;
    /* evict_mu: a CLOCK sweep sizes its travel and wraps its hand by nblocks.
     * ckpt_mu: the state file written here must not race another writer. */
    pthread_mutex_lock(&v->evict_mu);
    pthread_mutex_lock(&v->ckpt_mu);
    uint64_t old = v->size;
    if (new_size < old) { rc = -EINVAL; goto out; }
    if (new_size == old) goto out;
    /* 1. room in the cache file before any block there can become CLEAN */
    if (ftruncate(v->cache_fd, (off_t)new_size) < 0) { rc = -errno; goto out; }
    /* 2. the index, under idx_mu like every access to its state array: no
     *    reader, writer, install or sweep holds a pointer into it across this */
    pthread_mutex_lock(&v->idx_mu);
    if (block_index_grow(v->bi, new_size / GLIDE_BLOCK_SIZE) < 0) rc = -ENOMEM;
    else v->nblocks = new_size / GLIDE_BLOCK_SIZE;
    pthread_mutex_unlock(&v->idx_mu);
    if (rc) goto out;
    /* 3. durable before any request past the old end is accepted, so a WAL
     *    record there always lies inside the state file's size */
    rc = persist_state_locked(v, v->checkpoint_seq, NULL);
    if (rc) { set_failed(v, -rc); goto out; }
    crash_point("grow-after-state");
    /* 4. open the new blocks to requests */
    v->size = new_size;
out:
    pthread_mutex_unlock(&v->ckpt_mu);
    pthread_mutex_unlock(&v->evict_mu);
    return rc;
}

void volume_close(struct volume *v) {
    if (!v) return;
    wal_close(&v->wal);
    if (v->cache_fd >= 0) close(v->cache_fd);
    if (v->pressure_efd >= 0) close(v->pressure_efd);
    if (v->miss_efd >= 0) close(v->miss_efd);
    miss_table_free(v);
    block_index_destroy(v->bi);
    free(v);
}

/* ---------- index updates (caller holds wal.mu and idx_mu) ---------- */

static int block_is_zero_clean(struct volume *v, uint64_t lba) {
    uint8_t s = block_index_state(v->bi, lba);
    if (s & BLOCK_DIRTY) return 0;
    /* An ABSENT block the store does not hold reads as zeros. */
    return (s & BLOCK_BASE_MASK) == BLOCK_ZERO || ((s & BLOCK_BASE_MASK) == BLOCK_ABSENT && !(s & BLOCK_REMOTE));
}

static int apply_record(struct volume *v, const struct wal_record *r, struct wal_segment *seg, uint64_t data_off) {
    if (r->lba >= v->nblocks || r->nblocks > v->nblocks - r->lba) return -ERANGE;
    for (uint32_t i = 0; i < r->nblocks; i++) {
        uint64_t lba = r->lba + i;
        if (r->kind == WAL_KIND_ZERO_HOLE && block_is_zero_clean(v, lba)) continue;
        uint64_t off = r->kind == WAL_KIND_DATA ? data_off + (uint64_t)i * GLIDE_BLOCK_SIZE : 0;
        if (block_index_add_version(v->bi, lba, r->seq, r->kind, r->kind == WAL_KIND_DATA ? seg : NULL, off) < 0)
            return -ENOMEM;
        atomic_fetch_add(&v->nversions, 1);
    }
    return 0;
}

/* idx_mu: a passive volume's catch-up runs while it serves reads. */
static int replay_apply(void *ctx, const struct wal_record *r, struct wal_segment *seg, uint64_t data_off) {
    struct volume *v = ctx;
    pthread_mutex_lock(&v->idx_mu);
    int rc = apply_record(v, r, seg, data_off);
    pthread_mutex_unlock(&v->idx_mu);
    return rc;
}

/* ---------- write path ---------- */

uint64_t volume_charge(struct volume *v) {
    return v->wal.live_bytes + atomic_load(&v->nversions) * VERSION_CHARGE;
}

static void wait_for_budget(struct volume *v, uint64_t need) {
    /* caller holds wal.mu */
    for (;;) {
        uint64_t charge = volume_charge(v);
        if (charge * 2 > v->wal_budget && !v->pressure_signaled) {
            uint64_t one = 1;
            if (write(v->pressure_efd, &one, sizeof one) == sizeof one) v->pressure_signaled = 1;
        }
        /* Wait only if a checkpoint could free something; a single request larger
         * than the whole budget goes through on an empty log. */
        if (charge + need <= v->wal_budget || atomic_load(&v->nversions) == 0 || v->wal.stopping ||
            atomic_load(&v->read_only))
            return;
        atomic_fetch_add(&v->st.backpressure_waits, 1);
        pthread_cond_wait(&v->space_cv, &v->wal.mu);
    }
}

static int append_and_index(struct volume *v, uint8_t kind, uint64_t lba, uint64_t nblocks, const void *data,
                            uint64_t *seq) {
    int rc = atomic_load(&v->failed);
    if (rc) return -rc;
    if (atomic_load(&v->read_only) || atomic_load(&v->passive)) return -EROFS;
    pthread_mutex_lock(&v->wal.mu);
    if (kind == WAL_KIND_ZERO_HOLE) {
        /* Skip the record entirely when every block is already zero and clean:
         * discarding a fresh disk costs nothing. */
        pthread_mutex_lock(&v->idx_mu);
        uint64_t i = 0;
        while (i < nblocks && block_is_zero_clean(v, lba + i)) i++;
        pthread_mutex_unlock(&v->idx_mu);
        if (i == nblocks) { pthread_mutex_unlock(&v->wal.mu); *seq = 0; return 0; }
    }
    uint64_t need = WAL_REC_HDR_SIZE + (kind == WAL_KIND_DATA ? nblocks * GLIDE_BLOCK_SIZE : 0) +
                    nblocks * VERSION_CHARGE;
    wait_for_budget(v, need);
    if (atomic_load(&v->read_only)) { pthread_mutex_unlock(&v->wal.mu); return -EROFS; }
    struct wal_append_result res;
    rc = wal_append_locked(&v->wal, kind, lba, (uint32_t)nblocks, data, &res);
    if (rc == 0) {
        struct wal_record r = {.kind = kind, .seq = res.seq, .lba = lba, .nblocks = (uint32_t)nblocks};
        pthread_mutex_lock(&v->idx_mu);
        rc = apply_record(v, &r, res.seg, res.data_off);
        pthread_mutex_unlock(&v->idx_mu);
        if (rc) set_failed(v, ENOMEM);
        *seq = res.seq;
    }
    pthread_mutex_unlock(&v->wal.mu);
    if (rc == -ENOSPC || rc == -EDQUOT) return -ENOSPC;
    if (rc) atomic_fetch_add(&v->st.errors, 1);
    return rc;
}

static int check_range(struct volume *v, uint64_t off, uint64_t len) {
    if (off > v->size || len > v->size - off) return -ERANGE;
    return 0;
}

static int write_aligned(struct volume *v, uint64_t lba, uint64_t nblocks, const uint8_t *data, uint64_t *seq) {
    /* One record per at most GLIDE_MAX_IO bytes (requests are never larger). */
    const uint64_t maxb = GLIDE_MAX_IO / GLIDE_BLOCK_SIZE;
    while (nblocks) {
        uint64_t n = nblocks < maxb ? nblocks : maxb;
        int rc = append_and_index(v, WAL_KIND_DATA, lba, n, data, seq);
        if (rc) return rc;
        lba += n; nblocks -= n; data += n * GLIDE_BLOCK_SIZE;
    }
    return 0;
}

/* Partial block at the edges: read the whole block, patch it, write it back,
 * under rmw_mu so two partial writes to one block cannot lose each other. */
static int write_partial(struct volume *v, uint64_t off, uint64_t len, const void *data, uint64_t *seq) {
    uint8_t blk[GLIDE_BLOCK_SIZE];
    uint64_t lba = off / GLIDE_BLOCK_SIZE;
    uint64_t in = off % GLIDE_BLOCK_SIZE;
    int rc = volume_read(v, lba * GLIDE_BLOCK_SIZE, GLIDE_BLOCK_SIZE, blk);
    if (rc) return rc;
    if (data) memcpy(blk + in, data, len); else memset(blk + in, 0, len);
    return write_aligned(v, lba, 1, blk, seq);
}

static int write_range(struct volume *v, uint64_t off, uint64_t len, const uint8_t *data, int zero_kind,
                       uint64_t *seq) {
    uint64_t s = 0;
    *seq = 0;
    int rc = 0;
    uint64_t head = off % GLIDE_BLOCK_SIZE;
    if (head || len < GLIDE_BLOCK_SIZE) {
        uint64_t n = GLIDE_BLOCK_SIZE - head;
        if (n > len) n = len;
        pthread_mutex_lock(&v->rmw_mu);
        rc = write_partial(v, off, n, data, &s);
        pthread_mutex_unlock(&v->rmw_mu);
        if (rc) return rc;
        if (s > *seq) *seq = s;
        off += n; len -= n;
        if (data) data += n;
    }
    uint64_t full = len / GLIDE_BLOCK_SIZE;
    if (full) {
        if (data) rc = write_aligned(v, off / GLIDE_BLOCK_SIZE, full, data, &s);
        else {
            /* Zero records carry no data, but stay in bounded slices so one huge
             * request cannot take the whole index charge at once. */
            uint64_t lba = off / GLIDE_BLOCK_SIZE, left = full;
            const uint64_t slice = 1u << 18;
            while (left && !rc) {
                uint64_t n = left < slice ? left : slice;
                uint64_t s2 = 0;
                rc = append_and_index(v, (uint8_t)zero_kind, lba, n, NULL, &s2);
                if (s2 > s) s = s2;
                lba += n; left -= n;
            }
        }
        if (rc) return rc;
        if (s > *seq) *seq = s;
        off += full * GLIDE_BLOCK_SIZE;
        len -= full * GLIDE_BLOCK_SIZE;
        if (data) data += full * GLIDE_BLOCK_SIZE;
    }
    if (len) {
        pthread_mutex_lock(&v->rmw_mu);
        rc = write_partial(v, off, len, data, &s);
        pthread_mutex_unlock(&v->rmw_mu);
        if (rc) return rc;
        if (s > *seq) *seq = s;
    }
    return 0;
}

int volume_write(struct volume *v, uint64_t off, uint64_t len, const void *buf, uint64_t *seq) {
    *seq = 0;
    if (check_range(v, off, len)) return -ENOSPC;
    if (!len) return 0;
    atomic_fetch_add(&v->st.writes, 1);
    atomic_fetch_add(&v->st.write_bytes, len);
    return write_range(v, off, len, buf, 0, seq);
}

int volume_write_zeroes(struct volume *v, uint64_t off, uint64_t len, int no_hole, uint64_t *seq) {
    *seq = 0;
    if (check_range(v, off, len)) return -ENOSPC;
    if (!len) return 0;
    atomic_fetch_add(&v->st.zeroes, 1);
    return write_range(v, off, len, NULL, no_hole ? WAL_KIND_ZERO_ALLOC : WAL_KIND_ZERO_HOLE, seq);
}

int volume_trim(struct volume *v, uint64_t off, uint64_t len, uint64_t *seq) {
    *seq = 0;
    if (check_range(v, off, len)) return -EINVAL;
    atomic_fetch_add(&v->st.trims, 1);
    /* TRIM is advisory: only whole blocks inside the range are discarded. */
    uint64_t first = (off + GLIDE_BLOCK_SIZE - 1) / GLIDE_BLOCK_SIZE;
    uint64_t end = (off + len) / GLIDE_BLOCK_SIZE;
    if (end <= first) return 0;
    return write_range(v, first * GLIDE_BLOCK_SIZE, (end - first) * GLIDE_BLOCK_SIZE, NULL,
                       WAL_KIND_ZERO_HOLE, seq);
}

int volume_flush(struct volume *v) {
    if (atomic_load(&v->passive)) return -EROFS;
    atomic_fetch_add(&v->st.flushes, 1);
    return wal_sync_wait(&v->wal, wal_last_seq(&v->wal));
}

/* ---------- read path ---------- */

enum src_kind { SRC_ZERO, SRC_CACHE, SRC_WAL, SRC_MISS };
struct plan_entry {
    uint8_t kind;
    struct wal_segment *seg; /* referenced while the read runs */
    uint64_t off;
};

/* touch: a guest read (not the flusher's as-of read), which marks a block
 * served from the cache file as referenced for the CLOCK sweep. */
static void plan_block(struct volume *v, uint64_t lba, const struct block_version *ver, struct plan_entry *p,
                       int touch) {
    if (ver) {
        if (ver->kind == WAL_KIND_DATA) {
            p->kind = SRC_WAL;
            p->seg = ver->seg;
            p->off = ver->off;
            wal_segment_get(p->seg);
        } else {
            p->kind = SRC_ZERO;
        }
        return;
    }
    uint8_t st = block_index_state(v->bi, lba);
    uint8_t base = st & BLOCK_BASE_MASK;
    if (base == BLOCK_CLEAN) {
        p->kind = SRC_CACHE;
        p->off = lba * GLIDE_BLOCK_SIZE;
        if (touch && !(st & BLOCK_REFERENCED)) block_index_set_referenced(v->bi, lba, 1);
    }
    else if (base == BLOCK_ABSENT && (st & BLOCK_REMOTE)) p->kind = SRC_MISS;
    else p->kind = SRC_ZERO;
}

static void drop_plan_refs(struct plan_entry *p, int n) {
    for (int i = 0; i < n; i++)
        if (p[i].kind == SRC_WAL) wal_segment_put(p[i].seg);
}

/* Execute a plan of n consecutive blocks into out, coalescing runs that are
 * contiguous in the same file into one pread. Drops the segment references. */
static int run_plan(struct volume *v, struct plan_entry *p, int n, uint8_t *out) {
    int rc = 0;
    for (int i = 0; i < n;) {
        int j = i + 1;
        if (p[i].kind == SRC_ZERO) {
            while (j < n && p[j].kind == SRC_ZERO) j++;
            memset(out + (size_t)i * GLIDE_BLOCK_SIZE, 0, (size_t)(j - i) * GLIDE_BLOCK_SIZE);
        } else {
            while (j < n && p[j].kind == p[i].kind && p[j].seg == p[i].seg &&
                   p[j].off == p[i].off + (uint64_t)(j - i) * GLIDE_BLOCK_SIZE)
                j++;
            int fd = p[i].kind == SRC_CACHE ? v->cache_fd : p[i].seg->fd;
            int r = pread_full(fd, out + (size_t)i * GLIDE_BLOCK_SIZE, (size_t)(j - i) * GLIDE_BLOCK_SIZE, p[i].off);
            if (r && !rc) rc = r;
        }
        i = j;
    }
    for (int i = 0; i < n; i++)
        if (p[i].kind == SRC_WAL) wal_segment_put(p[i].seg);
    return rc;
}

/* Reads blocks into out; a block only the store has parks w (when given) and
 * returns VOLUME_PARKED, or, with w NULL, queues the fetch and returns
 * -EAGAIN. Every missing block of the chunk is queued at once, so a large
 * read fetches in parallel and re-parks at most once per chunk. */
static int read_blocks(struct volume *v, uint64_t lba, uint64_t nblocks, uint8_t *out, uint64_t as_of,
                       struct miss_waiter *w) {
    struct plan_entry plan[PLAN_CHUNK];
    while (nblocks) {
        int n = nblocks < PLAN_CHUNK ? (int)nblocks : PLAN_CHUNK;
        pthread_rwlock_rdlock(&v->evict_rw);
        pthread_mutex_lock(&v->idx_mu);
        int first_miss = -1;
        for (int i = 0; i < n; i++) {
            const struct block_version *ver = as_of == UINT64_MAX ? block_index_latest(v->bi, lba + i)
                                                                  : block_index_as_of(v->bi, lba + i, as_of);
            plan_block(v, lba + i, ver, &plan[i], as_of == UINT64_MAX);
            if (plan[i].kind == SRC_MISS) {
                /* passive: no fetcher may install into the shared cache file yet */
                int rc = atomic_load(&v->passive) ? -EAGAIN : miss_register(v, lba + i, first_miss < 0 ? w : NULL);
                if (rc) {
                    pthread_mutex_unlock(&v->idx_mu);
                    pthread_rwlock_unlock(&v->evict_rw);
                    drop_plan_refs(plan, i);
                    return rc;
                }
                if (first_miss < 0) first_miss = i;
            }
        }
        pthread_mutex_unlock(&v->idx_mu);
        if (first_miss >= 0) {
            pthread_rwlock_unlock(&v->evict_rw);
            drop_plan_refs(plan, n);
            return w ? VOLUME_PARKED : -EAGAIN;
        }
        if (as_of == UINT64_MAX) {
            /* a guest read served locally: cache hits, per block */
            unsigned long hits = 0;
            for (int i = 0; i < n; i++) hits += plan[i].kind == SRC_CACHE || plan[i].kind == SRC_WAL;
            if (hits) atomic_fetch_add_explicit(&v->io->cache_hits, hits, memory_order_relaxed);
        }
        int rc = run_plan(v, plan, n, out);
        pthread_rwlock_unlock(&v->evict_rw);
        if (rc) { atomic_fetch_add(&v->st.errors, 1); return rc; }
        lba += (uint64_t)n; nblocks -= (uint64_t)n; out += (size_t)n * GLIDE_BLOCK_SIZE;
    }
    return 0;
}

struct blocking_miss {
    struct miss_waiter base;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, err;
};

static void blocking_miss_done(struct miss_waiter *w, int err) {
    struct blocking_miss *b = (struct blocking_miss *)w;
    pthread_mutex_lock(&b->mu);
    b->done = 1;
    b->err = err;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* The blocking form: park, wait for the fetcher, run again. */
static int read_blocks_wait(struct volume *v, uint64_t lba, uint64_t nblocks, uint8_t *out, uint64_t as_of) {
    for (;;) {
        struct blocking_miss b = {.base = {.done = blocking_miss_done}};
        pthread_mutex_init(&b.mu, NULL);
        pthread_cond_init(&b.cv, NULL);
        int rc = read_blocks(v, lba, nblocks, out, as_of, &b.base);
        if (rc == VOLUME_PARKED) {
            pthread_mutex_lock(&b.mu);
            while (!b.done) pthread_cond_wait(&b.cv, &b.mu);
            pthread_mutex_unlock(&b.mu);
            rc = b.err ? -b.err : VOLUME_PARKED;
        }
        pthread_mutex_destroy(&b.mu);
        pthread_cond_destroy(&b.cv);
        if (rc != VOLUME_PARKED) return rc;
    }
}

int volume_read(struct volume *v, uint64_t off, uint64_t len, void *buf) {
    return volume_read_or_park(v, off, len, buf, NULL);
}

/* Without a waiter, wait here for the fetcher; with one, park and return. */
static int read_latest(struct volume *v, uint64_t lba, uint64_t n, uint8_t *out, struct miss_waiter *w) {
    return w ? read_blocks(v, lba, n, out, UINT64_MAX, w) : read_blocks_wait(v, lba, n, out, UINT64_MAX);
}

int volume_read_or_park(struct volume *v, uint64_t off, uint64_t len, void *buf, struct miss_waiter *w) {
    if (check_range(v, off, len)) return -EINVAL;
    if (!len) return 0;
    atomic_fetch_add(&v->st.reads, 1);
    atomic_fetch_add(&v->st.read_bytes, len);
    uint8_t *out = buf;
    uint64_t head = off % GLIDE_BLOCK_SIZE;
    if (head || len < GLIDE_BLOCK_SIZE) {
        uint8_t blk[GLIDE_BLOCK_SIZE];
        uint64_t n = GLIDE_BLOCK_SIZE - head;
        if (n > len) n = len;
        int rc = read_latest(v, off / GLIDE_BLOCK_SIZE, 1, blk, w);
        if (rc) return rc;
        memcpy(out, blk + head, n);
        off += n; len -= n; out += n;
    }
    uint64_t full = len / GLIDE_BLOCK_SIZE;
    if (full) {
        int rc = read_latest(v, off / GLIDE_BLOCK_SIZE, full, out, w);
        if (rc) return rc;
        off += full * GLIDE_BLOCK_SIZE; len -= full * GLIDE_BLOCK_SIZE; out += full * GLIDE_BLOCK_SIZE;
    }
    if (len) {
        uint8_t blk[GLIDE_BLOCK_SIZE];
        int rc = read_latest(v, off / GLIDE_BLOCK_SIZE, 1, blk, w);
        if (rc) return rc;
        memcpy(out, blk, len);
    }
    return 0;
}

int volume_read_block_as_of(struct volume *v, uint64_t lba, uint64_t seq, void *buf) {
    if (lba >= v->nblocks) return -EINVAL;
    return read_blocks_wait(v, lba, 1, buf, seq);
}

/* ---------- block status ---------- */

static uint32_t block_flags(struct volume *v, uint64_t lba) {
    const struct block_version *ver = block_index_latest(v->bi, lba);
    if (ver) {
        if (ver->kind == WAL_KIND_DATA) return 0;
        return ver->kind == WAL_KIND_ZERO_ALLOC ? 2u : 3u;
    }
    uint8_t st = block_index_state(v->bi, lba);
    uint8_t base = st & BLOCK_BASE_MASK;
    if (base == BLOCK_CLEAN || (base == BLOCK_ABSENT && (st & BLOCK_REMOTE))) return 0u;
    return 3u;
}

int volume_block_status(struct volume *v, uint64_t off, uint64_t len, extent_fn fn, void *ctx) {
    if (check_range(v, off, len) || !len) return -EINVAL;
    uint64_t lba = off / GLIDE_BLOCK_SIZE;
    uint64_t end = (off + len + GLIDE_BLOCK_SIZE - 1) / GLIDE_BLOCK_SIZE;
    uint64_t pos = off;
    while (lba < end) {
        pthread_mutex_lock(&v->idx_mu);
        uint32_t f = block_flags(v, lba);
        uint64_t j = lba + 1;
        /* bounded run per lock hold so a huge request cannot stall writers */
        while (j < end && j - lba < (1u << 16) && block_flags(v, j) == f) j++;
        pthread_mutex_unlock(&v->idx_mu);
        uint64_t stop = j * GLIDE_BLOCK_SIZE;
        if (stop > v->size) stop = v->size;
        uint64_t elen = stop - pos;
        int rc = fn(ctx, elen, f);
        if (rc) return rc > 0 ? 0 : rc;
        pos = stop;
        lba = j;
    }
    return 0;
}

/* ---------- the object-store side ---------- */

void volume_set_remote(struct volume *v, uint64_t lba, uint64_t n, int on) {
    if (lba >= v->nblocks) return;
    if (n > v->nblocks - lba) n = v->nblocks - lba;
    pthread_mutex_lock(&v->idx_mu);
    for (uint64_t i = 0; i < n; i++) block_index_set_remote(v->bi, lba + i, on);
    v->remote_changed = 1;
    pthread_mutex_unlock(&v->idx_mu);
}


int volume_flush_cut(struct volume *v, uint64_t *cut) {
    if (atomic_load(&v->passive)) return -EROFS;
    pthread_mutex_lock(&v->wal.mu);
    int rc = wal_cut_locked(&v->wal, cut);
    pthread_mutex_unlock(&v->wal.mu);
    return rc;
}

struct dirty_ctx {
    dirty_fn fn;
    void *ctx;
};

static int dirty_visit(void *ctx, uint64_t lba, const struct block_version *ver) {
    struct dirty_ctx *d = ctx;
    return d->fn(d->ctx, lba, ver->kind);
}

int volume_dirty_upto(struct volume *v, uint64_t cut, dirty_fn fn, void *ctx) {
    struct dirty_ctx d = {fn, ctx};
    pthread_mutex_lock(&v->idx_mu);
    int rc = block_index_visit_upto(v->bi, cut, dirty_visit, &d);
    pthread_mutex_unlock(&v->idx_mu);
    return rc;
}

int volume_local_only(struct volume *v, dirty_fn fn, void *ctx) {
    int rc = 0;
    pthread_mutex_lock(&v->idx_mu);
    const uint64_t nb = v->nblocks; /* changes only under idx_mu */
    for (uint64_t lba = 0; lba < nb && !rc; lba++) {
        uint8_t st = block_index_state(v->bi, lba);
        if (!(st & (BLOCK_DIRTY | BLOCK_REMOTE)) && (st & BLOCK_BASE_MASK) == BLOCK_CLEAN)
            rc = fn(ctx, lba, WAL_KIND_DATA);
    }
    pthread_mutex_unlock(&v->idx_mu);
    return rc;
}

/* n consecutive blocks as of seq (UINT64_MAX: current), one plan per
 * PLAN_CHUNK blocks and coalesced preads: the pack builder's bulk read. */
int volume_read_blocks_as_of(struct volume *v, uint64_t lba, uint64_t n, uint64_t seq, void *buf) {
    if (lba >= v->nblocks || n > v->nblocks - lba) return -EINVAL;
    return read_blocks_wait(v, lba, n, buf, seq);
}

void volume_set_wal_budget(struct volume *v, uint64_t budget) {
    pthread_mutex_lock(&v->wal.mu);
    v->wal_budget = budget;
    pthread_cond_broadcast(&v->space_cv);
    pthread_mutex_unlock(&v->wal.mu);
}

void volume_set_read_only(struct volume *v) {
    pthread_mutex_lock(&v->wal.mu);
    atomic_store(&v->read_only, 1);
    pthread_cond_broadcast(&v->space_cv); /* writers waiting for budget fail now */
    pthread_mutex_unlock(&v->wal.mu);
}
