/* checkpoint.c — the checkpoint (write back the WAL into the cache file,
 * drop versions, persist the state file, retire segments) and the state file
 * on disk: atomic replacement on write, decode into the index at open.
 *
 * Invariant 4: the cache file is written only for blocks that are still
 * DIRTY, only after the WAL records being written back are durable, and the
 * blocks leave DIRTY only after the cache file's fdatasync. A state file
 * never records an installed block as CLEAN before an fdatasync covering the
 * install (sync_installs). Every state file write holds ckpt_mu, so two
 * writers (a checkpoint, an eviction batch) never put an older snapshot over
 * a newer one. A cancelled write-back (volume_cancel_write_back) stops
 * between copies, the blocks still DIRTY and written_back_seq unmoved.
 *
 * The sequential cutoff: a write-back given `bypass` > 0 copies no run of
 * at least that many consecutive data blocks; it marks them BYPASSED instead
 * (block_index.h). A checkpoint whose caller committed the cut to the store
 * (`bypass` > 0 again) makes them ABSENT, so a streamed byte reaches the disk
 * once in the WAL and once in the store, never in the cache file; a read
 * fetches it back. A checkpoint without that promise copies every BYPASSED
 * block first, so the cache file again holds what written_back_seq says.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crash_point.h"
#include "glide_common.h"
#include "volume_internal.h"

/* ---------- the state file on disk ---------- */

int encode_state(struct volume *v, struct state_image *img) {
    return state_encode_runs(block_index_states(v->bi), v->nblocks, img);
}

/* Atomic replacement: temp file, fsync, rename, fsync the directory. The
 * caller holds ckpt_mu (checkpoints and eviction batches both come here).
 * Consumes img. */
int write_state_file(struct volume *v, struct state_image *img, uint64_t ckpt_seq, uint64_t *bytes_out) {
    struct state_header h = {.nblocks = img->nblocks, .checkpoint_seq = ckpt_seq,
                             .manifest_version = v->manifest_version};
    memcpy(h.volume_id, v->volume_id, 16);
    state_seal(img, &h);
    uint8_t *buf = img->buf;
    size_t len = img->len;

    char tmp[4096 + 32], path[4096 + 32];
    snprintf(tmp, sizeof tmp, "%s/state.tmp", v->dir);
    snprintf(path, sizeof path, "%s/state", v->dir);
    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) { rc = -errno; goto out; }
    rc = pwrite_full(fd, buf, len, 0);
    if (!rc && fsync(fd) < 0) rc = -errno;
    close(fd);
    if (!rc && rename(tmp, path) < 0) rc = -errno;
    if (!rc) {
        int dfd = open(v->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) < 0) rc = -errno;
        if (dfd >= 0) close(dfd);
    }
    if (bytes_out) *bytes_out = len;
out:
    free(buf);
    img->buf = NULL;
    return rc;
}

static void apply_run(void *ctx, uint64_t lba, uint64_t count, uint8_t base, int remote) {
    struct volume *v = ctx;
    if (!base && !remote) return; /* what a fresh index already says */
    for (uint64_t i = 0; i < count; i++) {
        block_index_set_base(v->bi, lba + i, base);
        block_index_set_remote(v->bi, lba + i, remote);
    }
}

/* The whole state file into *buf (malloc'd). */
static int load_state_file(const char *path, uint8_t **buf, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat sb;
    if (fstat(fd, &sb) < 0) { int e = -errno; close(fd); return e; }
    *len = (size_t)sb.st_size;
    *buf = malloc(*len ? *len : 1);
    if (!*buf) { close(fd); return -ENOMEM; }
    int rc = pread_full(fd, *buf, *len, 0);
    close(fd);
    if (rc) { free(*buf); *buf = NULL; }
    return rc;
}

/* The file's identity for state_file_unchanged: its length and its CRC (the
 * last 4 bytes, over everything before them). */
static uint32_t state_crc_word(const uint8_t *buf, size_t len) {
    uint32_t c = 0;
    if (len >= 4) memcpy(&c, buf + len - 4, 4);
    return c;
}

int state_file_unchanged(struct volume *v, char *err, size_t errlen) {
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/state", v->dir);
    uint8_t *buf;
    size_t len;
    int rc = load_state_file(path, &buf, &len);
    if (rc) { snprintf(err, errlen, "cannot read state file %s: %s", path, strerror(-rc)); return rc; }
    struct state_header h = {0};
    int dr = state_decode_header(buf, len, &h);
    if (!dr && len == v->state_len && state_crc_word(buf, len) == v->state_crc && h.checkpoint_seq == v->state_ckpt) {
        free(buf);
        return 0;
    }
    free(buf);
    snprintf(err, errlen, "state file %s changed since the passive open (checkpoint seq %llu, now %llu%s): "
             "the predecessor checkpointed, evicted or grew during the handoff; refusing to activate",
             path, (unsigned long long)v->state_ckpt, (unsigned long long)h.checkpoint_seq,
             dr ? ", unreadable" : "");
    return -ESTALE;
}

int read_state_file(struct volume *v, uint64_t *ckpt_seq, uint64_t *file_nblocks, char *err, size_t errlen) {
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/state", v->dir);
    uint8_t *buf;
    size_t len;
    int rc = load_state_file(path, &buf, &len);
    if (rc) return rc;
    struct state_header h;
    int dr = state_decode_header(buf, len, &h);
    rc = -EUCLEAN;
    if (dr) goto bad;
    v->state_ckpt = h.checkpoint_seq;
    v->state_len = len;
    v->state_crc = state_crc_word(buf, len);
    if (h.nblocks > v->nblocks) {
        snprintf(err, errlen, "volume at %s has %llu bytes but the configuration says %llu; "
                 "shrinking a volume is not supported (configure at least %llu bytes)", v->dir,
                 (unsigned long long)(h.nblocks * GLIDE_BLOCK_SIZE), (unsigned long long)v->size,
                 (unsigned long long)(h.nblocks * GLIDE_BLOCK_SIZE));
        rc = -EINVAL;
        goto out;
    }
    /* Fewer blocks than configured: the volume grew, and the blocks past the
     * state file's end stay ABSENT (zeros). */
    *file_nblocks = h.nblocks;
    *ckpt_seq = h.checkpoint_seq;
    v->manifest_version = h.manifest_version;
    memcpy(v->volume_id, h.volume_id, 16);
    dr = state_decode_runs(buf, len, &h, apply_run, v);
    if (dr) goto bad;
    rc = 0;
    goto out;
bad:
    snprintf(err, errlen, "state file %s%s", path, state_decode_error(dr));
out:
    free(buf);
    return rc;
}

int persist_state_locked(struct volume *v, uint64_t ckpt_seq, uint64_t *bytes_out) {
    struct state_image img;
    pthread_mutex_lock(&v->idx_mu);
    int rc = encode_state(v, &img);
    uint64_t installs = atomic_load(&v->installs);
    if (!rc) v->remote_changed = 0;
    pthread_mutex_unlock(&v->idx_mu);
    if (rc) return rc;
    rc = sync_installs(v, installs);
    if (!rc) rc = write_state_file(v, &img, ckpt_seq, bytes_out);
    else free(img.buf);
    if (rc) {
        pthread_mutex_lock(&v->idx_mu);
        v->remote_changed = 1; /* the snapshot that cleared it never reached the disk */
        pthread_mutex_unlock(&v->idx_mu);
    }
    return rc;
}

/* ---------- checkpoint ---------- */

struct wb_item {
    uint64_t lba;
    uint64_t off;
    struct wal_segment *seg;
    uint8_t kind;
    uint8_t bypass; /* part of a run at or past the cutoff: not copied */
};

struct wb_list {
    struct wb_item *items;
    size_t n, cap;
    uint64_t done_upto; /* written_back_seq: versions <= this are in the cache file already */
    const struct block_index *bypassed_only; /* set: collect just the BYPASSED blocks, all of them */
};

static int collect_wb(void *ctx, uint64_t lba, const struct block_version *ver) {
    struct wb_list *l = ctx;
    if (l->bypassed_only) {
        if (!(block_index_state(l->bypassed_only, lba) & BLOCK_BYPASSED)) return 0;
    } else if (ver->seq <= l->done_upto) {
        /* The newest version <= cut is also the newest <= done_upto, so an
         * earlier write-back copied it (or bypassed it, as its BYPASSED bit
         * says) and, the block being DIRTY since, nothing has touched that
         * copy. A flush retried while the store is down would otherwise
         * rewrite everything on every attempt. */
        return 0;
    }
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 1024;
        struct wb_item *ni = realloc(l->items, nc * sizeof *ni);
        if (!ni) return -ENOMEM;
        l->items = ni;
        l->cap = nc;
    }
    l->items[l->n++] = (struct wb_item){lba, ver->off, ver->seg, ver->kind, 0};
    return 0;
}

static int cmp_wb(const void *a, const void *b) {
    uint64_t x = ((const struct wb_item *)a)->lba, y = ((const struct wb_item *)b)->lba;
    return x < y ? -1 : x > y;
}

#define WB_RUN_BLOCKS 256u /* 1 MiB per copy */
/* Start the kernel writing the cache file every this many bytes copied, so the
 * fdatasync at the end finds most pages already on their way to the disk
 * instead of starting all of them at once. */
#define WB_KICK_BYTES (8u << 20)

static int write_back(struct volume *v, struct wb_list *l, struct checkpoint_stats *st) {
    uint8_t *buf = malloc((size_t)WB_RUN_BLOCKS * GLIDE_BLOCK_SIZE);
    if (!buf) return -ENOMEM;
    int rc = 0;
    size_t unkicked = 0;
    for (size_t i = 0; i < l->n && !rc; i++) {
        if (atomic_load(&v->wb_cancel)) { rc = -ECANCELED; break; }
        struct wb_item *it = &l->items[i];
        uint64_t coff = it->lba * GLIDE_BLOCK_SIZE;
        if (it->bypass) {
            st->blocks_bypassed++;
            continue;
        }
        if (it->kind == WAL_KIND_DATA) {
            /* Items are sorted by lba: a run of blocks that sit back to back in
             * one segment (a sequential write) is one read and one write. */
            size_t n = 1;
            while (i + n < l->n && n < WB_RUN_BLOCKS && l->items[i + n].kind == WAL_KIND_DATA &&
                   !l->items[i + n].bypass &&
                   l->items[i + n].lba == it->lba + n && l->items[i + n].seg == it->seg &&
                   l->items[i + n].off == it->off + n * GLIDE_BLOCK_SIZE)
                n++;
            size_t bytes = n * GLIDE_BLOCK_SIZE;
            rc = pread_full(it->seg->fd, buf, bytes, it->off);
            if (!rc) rc = pwrite_full(v->cache_fd, buf, bytes, coff);
            st->blocks_written += n;
            i += n - 1;
            unkicked += bytes;
            if (unkicked >= WB_KICK_BYTES) {
                /* Advisory and asynchronous: an error here resurfaces at the fdatasync. */
                (void)sync_file_range(v->cache_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
                unkicked = 0;
            }
        } else {
            int mode = it->kind == WAL_KIND_ZERO_HOLE ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
                                                      : (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
            if (fallocate(v->cache_fd, mode, (off_t)coff, GLIDE_BLOCK_SIZE) < 0) {
                memset(buf, 0, GLIDE_BLOCK_SIZE);
                rc = pwrite_full(v->cache_fd, buf, GLIDE_BLOCK_SIZE, coff);
            }
            st->blocks_zeroed++;
        }
    }
    free(buf);
    return rc;
}

/* Installs pwrite the cache file without syncing it, so a state file may
 * record an installed block as CLEAN only once an fdatasync has covered the
 * install. `seen` is the install count read under idx_mu together with the
 * snapshot about to be persisted: every install it counts has done its
 * pwrite. Caller holds ckpt_mu. */
int sync_installs(struct volume *v, uint64_t seen) {
    if (seen == v->synced_installs) return 0;
    if (fdatasync(v->cache_fd) < 0) return -errno;
    v->synced_installs = seen;
    return 0;
}

/* The cutoff over l (sorted by lba): every data block in a run of at least
 * `bypass` consecutive data blocks is left out of the copy. Then, under
 * idx_mu, each collected block's BYPASSED bit says whether its newest version
 * <= the cut is left out: set for these, cleared for the rest (a block
 * bypassed by an earlier write-back and rewritten since is decided again). */
static void mark_bypassed(struct volume *v, struct wb_list *l, uint32_t bypass) {
    if (bypass) {
        for (size_t i = 0; i < l->n;) {
            size_t j = i + 1;
            if (l->items[i].kind == WAL_KIND_DATA)
                while (j < l->n && l->items[j].kind == WAL_KIND_DATA && l->items[j].lba == l->items[j - 1].lba + 1)
                    j++;
            if (l->items[i].kind == WAL_KIND_DATA && j - i >= bypass)
                for (size_t k = i; k < j; k++) l->items[k].bypass = 1;
            i = j;
        }
    }
    pthread_mutex_lock(&v->idx_mu);
    for (size_t i = 0; i < l->n; i++) block_index_set_bypassed(v->bi, l->items[i].lba, l->items[i].bypass);
    pthread_mutex_unlock(&v->idx_mu);
}

/* Steps 1 and 2 of a checkpoint: after them the synced cache file holds each
 * block's newest version <= cut, except those BYPASSED. The blocks stay DIRTY
 * (their versions stay in the index), so nothing reads the copies yet, and
 * neither eviction nor an install touches a DIRTY block: the copies stay
 * valid until a checkpoint up to `cut` drops the versions. Caller holds
 * ckpt_mu. */
static int write_back_upto_locked(struct volume *v, uint64_t cut, uint32_t bypass, struct checkpoint_stats *st) {
    if (cut <= v->written_back_seq) return 0;
    /* 1. the records being written back must be durable before the cache file
     *    holds anything derived from them */
    int rc = wal_sync_wait(&v->wal, cut);
    if (rc) return rc;
    if (atomic_load(&v->wb_cancel)) return -ECANCELED;

    /* 2. copy each block's newest version <= cut into the cache file; the
     *    blocks stay DIRTY meanwhile, so readers keep using the WAL */
    struct wb_list l = {.done_upto = v->written_back_seq};
    pthread_mutex_lock(&v->idx_mu);
    rc = block_index_visit_upto(v->bi, cut, collect_wb, &l);
    pthread_mutex_unlock(&v->idx_mu);
    if (!rc) {
        qsort(l.items, l.n, sizeof *l.items, cmp_wb);
        mark_bypassed(v, &l, bypass);
        rc = write_back(v, &l, st);
    }
    free(l.items);
    if (rc == -ECANCELED) return rc; /* stopped on request: nothing is wrong */
    if (rc) { set_failed(v, -rc); return rc; }
    crash_point("checkpoint-after-writeback");
    uint64_t installs = atomic_load(&v->installs);
    if (fdatasync(v->cache_fd) < 0) { rc = -errno; set_failed(v, errno); return rc; }
    v->synced_installs = installs;
    v->written_back_seq = cut;
    crash_point("checkpoint-after-cache-sync");
    return 0;
}

/* For a checkpoint whose caller committed nothing to the store: copy every
 * BYPASSED block's newest version <= written_back_seq (the one its bit is
 * about) after all, and clear the bits, so the cache file holds what
 * written_back_seq says and the drop makes those blocks CLEAN. Caller holds
 * ckpt_mu. */
static int copy_bypassed_locked(struct volume *v, struct checkpoint_stats *st) {
    struct wb_list l = {.bypassed_only = v->bi};
    pthread_mutex_lock(&v->idx_mu);
    int rc = block_index_visit_upto(v->bi, v->written_back_seq, collect_wb, &l);
    pthread_mutex_unlock(&v->idx_mu);
    if (!rc && l.n) {
        qsort(l.items, l.n, sizeof *l.items, cmp_wb);
        rc = write_back(v, &l, st);
        uint64_t installs = atomic_load(&v->installs);
        if (!rc && fdatasync(v->cache_fd) < 0) rc = -errno;
        if (!rc) {
            v->synced_installs = installs;
            mark_bypassed(v, &l, 0);
        }
    }
    free(l.items);
    if (rc && rc != -ECANCELED) set_failed(v, -rc);
    return rc;
}

struct uncached {
    uint64_t *lbas;
    size_t n, cap;
};

static int note_uncached(void *ctx, uint64_t lba) {
    struct uncached *u = ctx;
    if (u->n == u->cap) {
        size_t nc = u->cap ? u->cap * 2 : 1024;
        uint64_t *nl = realloc(u->lbas, nc * sizeof *nl);
        if (!nl) return -1;
        u->lbas = nl;
        u->cap = nc;
    }
    u->lbas[u->n++] = lba;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Punch the cache-file bytes of blocks a checkpoint made ABSENT from CLEAN
 * (overwritten by a bypassed run), once a durable state file says ABSENT:
 * the same order as an eviction batch (evict.c), for the same reason. Each
 * run is re-checked under idx_mu, which an install holds for its pwrite, so
 * a block installed again since is left alone. Errors are harmless (the
 * blocks are ABSENT either way) and not reported. Caller holds ckpt_mu. */
static void punch_uncached(struct volume *v, struct uncached *u) {
    qsort(u->lbas, u->n, sizeof *u->lbas, cmp_u64);
    for (size_t i = 0; i < u->n;) {
        pthread_mutex_lock(&v->idx_mu);
        if ((block_index_state(v->bi, u->lbas[i]) & BLOCK_BASE_MASK) != BLOCK_ABSENT) {
            pthread_mutex_unlock(&v->idx_mu);
            i++;
            continue;
        }
        size_t j = i + 1;
        while (j < u->n && u->lbas[j] == u->lbas[j - 1] + 1 &&
               (block_index_state(v->bi, u->lbas[j]) & BLOCK_BASE_MASK) == BLOCK_ABSENT)
            j++;
        (void)fallocate(v->cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        (off_t)(u->lbas[i] * GLIDE_BLOCK_SIZE), (off_t)((j - i) * GLIDE_BLOCK_SIZE));
        pthread_mutex_unlock(&v->idx_mu);
        i = j;
    }
}

/* Takes ckpt_mu and the cut both halves of a checkpoint work up to: the
 * sealed end of the WAL, or `upto` if earlier. On error ckpt_mu is not held. */
static int lock_and_cut(struct volume *v, uint64_t upto, struct checkpoint_stats *st, uint64_t *cut) {
    memset(st, 0, sizeof *st);
    int rc = atomic_load(&v->failed);
    if (rc) return -rc;
    if (atomic_load(&v->passive)) return -EROFS;
    pthread_mutex_lock(&v->ckpt_mu);
    pthread_mutex_lock(&v->wal.mu);
    rc = wal_cut_locked(&v->wal, cut);
    pthread_mutex_unlock(&v->wal.mu);
    if (rc) {
        pthread_mutex_unlock(&v->ckpt_mu);
        return rc;
    }
    if (upto < *cut) *cut = upto;
    st->cut_seq = *cut;
    return 0;
}

int volume_write_back(struct volume *v, uint64_t upto, uint32_t bypass, struct checkpoint_stats *st) {
    memset(st, 0, sizeof *st);
    if (atomic_load(&v->wb_cancel)) return -ECANCELED; /* not even a WAL cut */
    uint64_t cut;
    int rc = lock_and_cut(v, upto, st, &cut);
    if (rc) return rc;
    if (cut > v->checkpoint_seq) rc = write_back_upto_locked(v, cut, bypass, st);
    pthread_mutex_unlock(&v->ckpt_mu);
    return rc;
}

int volume_checkpoint(struct volume *v, uint64_t upto, uint32_t bypass, struct checkpoint_stats *st) {
    uint64_t cut;
    int rc = lock_and_cut(v, upto, st, &cut);
    if (rc) return rc;
    if (cut <= v->checkpoint_seq) {
        /* Nothing to write back, but REMOTE bits set since the last state
         * file (a cold open marking what the store holds) must still be made
         * durable: a restart that forgot them would read those blocks as zeros. */
        pthread_mutex_lock(&v->idx_mu);
        int changed = v->remote_changed; /* only state file writers clear it, and they hold ckpt_mu */
        pthread_mutex_unlock(&v->idx_mu);
        if (!changed) goto out;
        rc = persist_state_locked(v, v->checkpoint_seq, &st->state_bytes);
        if (rc && rc != -ENOMEM) set_failed(v, -rc);
        goto out;
    }
    crash_point("checkpoint-after-cut");

    /* 1-2. unless volume_write_back already did it up to this cut; with no
     *      commit behind this checkpoint, blocks an earlier write-back
     *      bypassed are copied now */
    rc = write_back_upto_locked(v, cut, bypass, st);
    if (!rc && !bypass) rc = copy_bypassed_locked(v, st);
    if (rc) goto out;

    /* 3. forget versions <= cut and snapshot the base states as of cut.
     *    Exclusive evict_rw: a block going from CLEAN to ABSENT here has its
     *    bytes punched below, so no read may still be between planning
     *    "cache file" and its pread (as in an eviction batch). */
    uint64_t installs;
    struct state_image img;
    struct uncached unc = {0};
    if (bypass) pthread_rwlock_wrlock(&v->evict_rw); /* without: copy_bypassed_locked cleared every bit */
    pthread_mutex_lock(&v->idx_mu);
    if (bypass) pthread_rwlock_unlock(&v->evict_rw); /* drained; later reads plan under idx_mu, after the drop */
    uint64_t before = block_index_version_count(v->bi);
    int dropped_ok = block_index_drop_upto(v->bi, cut, note_uncached, &unc) >= 0;
    atomic_fetch_sub(&v->nversions, before - block_index_version_count(v->bi));
    rc = encode_state(v, &img);
    installs = atomic_load(&v->installs);
    if (!rc) v->remote_changed = 0;
    pthread_mutex_unlock(&v->idx_mu);
    /* Dropped versions with no state file written are harmless: the blocks'
     * data is in the synced cache file or (BYPASSED) the store, and the WAL
     * still holds them all. A punch list that ran out of memory only leaves
     * stale bytes under ABSENT blocks, which nothing reads. */
    (void)dropped_ok;
    if (rc) { free(unc.lbas); goto out; }

    /* 4. persist, then the WAL up to cut is no longer needed */
    rc = sync_installs(v, installs);
    if (!rc) rc = write_state_file(v, &img, cut, &st->state_bytes);
    else free(img.buf);
    if (rc) { set_failed(v, -rc); free(unc.lbas); goto out; }
    crash_point("checkpoint-after-state");
    if (unc.n) punch_uncached(v, &unc);
    free(unc.lbas);
    v->checkpoint_seq = cut;
    wal_retire_upto(&v->wal, cut);
    crash_point("checkpoint-after-retire");
    atomic_fetch_add(&v->st.checkpoints, 1);

    pthread_mutex_lock(&v->wal.mu);
    v->pressure_signaled = 0;
    pthread_cond_broadcast(&v->space_cv);
    pthread_mutex_unlock(&v->wal.mu);
out:
    pthread_mutex_unlock(&v->ckpt_mu);
    return rc;
}
