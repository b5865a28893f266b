/* volume.c — read/write paths, checkpoint and state file of one volume (see volume.h). */
#define _GNU_SOURCE
#include "volume.h"

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
#include "crc32c.h"
#include "glide_common.h"

#define STATE_MAGIC 0x41545347u /* "GSTA" */
#define STATE_VERSION 2u /* 2: runs carry the REMOTE bit (count << 3); 1 is still read */
#define STATE_HDR 64u
/* Index memory is charged against the WAL budget so that zero-range records
 * (a few bytes of WAL, many index entries) cannot grow memory without limit. */
#define VERSION_CHARGE 64u
#define PLAN_CHUNK 64
#define MISS_BUCKETS 4096u

struct miss_entry {
    uint64_t lba;
    struct miss_waiter *waiters;
    struct miss_entry *next;
};

static void miss_fire(struct miss_waiter *ws, int err);

/* ---------- small I/O helpers ---------- */

static int pread_full(int fd, void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) { memset((char *)buf + done, 0, len - done); return 0; } /* sparse tail */
        done += (size_t)n;
    }
    return 0;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        done += (size_t)n;
    }
    return 0;
}

static void set_failed(struct volume *v, int err) {
    int zero = 0;
    atomic_compare_exchange_strong(&v->failed, &zero, err);
}

/* ---------- state file ---------- */

static size_t put_varint(uint8_t *p, uint64_t x) {
    size_t n = 0;
    while (x >= 0x80) { p[n++] = (uint8_t)(x | 0x80); x >>= 7; }
    p[n++] = (uint8_t)x;
    return n;
}

static int get_varint(const uint8_t *p, size_t len, size_t *pos, uint64_t *x) {
    uint64_t r = 0;
    for (int shift = 0; shift < 64 && *pos < len; shift += 7) {
        uint8_t b = p[(*pos)++];
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) { *x = r; return 0; }
    }
    return -1;
}

/* The runs of a state file, encoded from the index while the caller holds
 * idx_mu (or owns the index alone): one pass, and memory in proportion to the
 * runs rather than to the volume. The header and CRC are filled in by
 * write_state_file, outside the lock. */
struct state_image {
    uint8_t *buf;
    size_t len, cap;
};

static int encode_state(struct volume *v, struct state_image *img) {
    img->cap = STATE_HDR + 4 + 64;
    img->len = STATE_HDR;
    img->buf = malloc(img->cap);
    if (!img->buf) return -ENOMEM;
    const uint8_t *st = block_index_states(v->bi);
    uint64_t i = 0;
    while (i < v->nblocks) {
        uint8_t code = st[i] & BLOCK_PERSISTED_MASK;
        uint64_t j = i + 1;
        while (j < v->nblocks && (st[j] & BLOCK_PERSISTED_MASK) == code) j++;
        if (img->len + 16 + 4 > img->cap) {
            uint8_t *nb = realloc(img->buf, img->cap * 2);
            if (!nb) { free(img->buf); img->buf = NULL; return -ENOMEM; }
            img->buf = nb;
            img->cap *= 2;
        }
        /* 3 bits per run: base state in bits 0-1, REMOTE in bit 2 */
        uint64_t c3 = (code & BLOCK_BASE_MASK) | ((code & BLOCK_REMOTE) ? 4u : 0u);
        img->len += put_varint(img->buf + img->len, ((j - i) << 3) | c3);
        i = j;
    }
    return 0;
}

/* Atomic replacement: temp file, fsync, rename, fsync the directory. The
 * caller holds ckpt_mu (checkpoints and eviction batches both come here).
 * Consumes img. */
static int write_state_file(struct volume *v, struct state_image *img, uint64_t ckpt_seq, uint64_t *bytes_out) {
    uint8_t *buf = img->buf;
    size_t len = img->len;
    memset(buf, 0, STATE_HDR);
    put_le32(buf, STATE_MAGIC);
    put_le32(buf + 4, STATE_VERSION);
    put_le32(buf + 8, GLIDE_BLOCK_SIZE);
    put_le64(buf + 16, v->nblocks);
    put_le64(buf + 24, ckpt_seq);
    put_le64(buf + 32, v->manifest_version);
    memcpy(buf + 40, v->volume_id, 16);
    put_le64(buf + 56, len - STATE_HDR);
    put_le32(buf + len, crc32c(0, buf, len));
    len += 4;

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

static int read_state_file(struct volume *v, uint64_t *ckpt_seq, char *err, size_t errlen) {
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/state", v->dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat sb;
    if (fstat(fd, &sb) < 0) { int e = -errno; close(fd); return e; }
    size_t len = (size_t)sb.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) { close(fd); return -ENOMEM; }
    int rc = pread_full(fd, buf, len, 0);
    close(fd);
    if (rc) { free(buf); return rc; }
    rc = -EUCLEAN;
    if (len < STATE_HDR + 4 || get_le32(buf) != STATE_MAGIC || crc32c(0, buf, len - 4) != get_le32(buf + len - 4)) {
        snprintf(err, errlen, "state file %s is corrupt (bad magic or checksum)", path);
        goto out;
    }
    uint32_t version = get_le32(buf + 4);
    if ((version != 1 && version != STATE_VERSION) || get_le32(buf + 8) != GLIDE_BLOCK_SIZE) {
        snprintf(err, errlen, "state file %s has an unsupported version or block size", path);
        goto out;
    }
    uint64_t nblocks = get_le64(buf + 16);
    if (nblocks != v->nblocks) {
        snprintf(err, errlen, "volume at %s has %llu bytes but the configuration says %llu; "
                 "resizing is not supported", v->dir,
                 (unsigned long long)(nblocks * GLIDE_BLOCK_SIZE), (unsigned long long)v->size);
        rc = -EINVAL;
        goto out;
    }
    *ckpt_seq = get_le64(buf + 24);
    v->manifest_version = get_le64(buf + 32);
    memcpy(v->volume_id, buf + 40, 16);
    uint64_t rlen = get_le64(buf + 56);
    if (rlen != len - 4 - STATE_HDR) { snprintf(err, errlen, "state file %s: bad length", path); goto out; }
    size_t pos = STATE_HDR;
    uint64_t lba = 0;
    while (pos < len - 4) {
        uint64_t x;
        if (get_varint(buf, len - 4, &pos, &x) < 0) break;
        unsigned shift = version == 1 ? 2 : 3;
        uint64_t count = x >> shift;
        uint8_t code = (uint8_t)(x & ((1u << shift) - 1));
        uint8_t base = code & BLOCK_BASE_MASK;
        int remote = (code & 4u) != 0;
        if (base > BLOCK_ZERO || count > nblocks - lba) { lba = UINT64_MAX; break; }
        if (code)
            for (uint64_t i = 0; i < count; i++) {
                block_index_set_base(v->bi, lba + i, base);
                block_index_set_remote(v->bi, lba + i, remote);
            }
        lba += count;
    }
    if (lba != nblocks) { snprintf(err, errlen, "state file %s: block runs do not cover the volume", path); goto out; }
    rc = 0;
out:
    free(buf);
    return rc;
}

/* ---------- open / close ---------- */

static int replay_apply(void *ctx, const struct wal_record *r, struct wal_segment *seg, uint64_t data_off);

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
    if (mkdir(v->dir, 0700) < 0 && errno != EEXIST) {
        rc = -errno;
        snprintf(err, errlen, "cannot create %s: %s", v->dir, strerror(errno));
        goto fail;
    }
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/cache", v->dir);
    v->cache_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (v->cache_fd < 0) { rc = -errno; snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno)); goto fail; }
    struct stat sb;
    if (fstat(v->cache_fd, &sb) < 0) { rc = -errno; goto fail; }
    if ((uint64_t)sb.st_size != v->size && ftruncate(v->cache_fd, (off_t)v->size) < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot size cache file %s: %s", path, strerror(errno));
        goto fail;
    }

    uint64_t ckpt = 0;
    rc = read_state_file(v, &ckpt, err, errlen);
    if (rc == -ENOENT) {
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
    v->checkpoint_seq = ckpt;
    v->written_back_seq = ckpt;

    snprintf(path, sizeof path, "%s/wal", v->dir);
    rc = wal_open(&v->wal, path, v->volume_id, cfg->seg_size, ckpt, replay_apply, v, &v->replay, err, errlen);
    if (rc) {
        if (!err[0]) snprintf(err, errlen, "cannot open WAL in %s: %s", path, strerror(-rc));
        goto fail;
    }
    v->pressure_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (v->pressure_efd < 0) { rc = -errno; goto fail; }
    v->miss_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (v->miss_efd < 0) { rc = -errno; goto fail; }
    *out = v;
    return 0;
fail:
    volume_close(v);
    return rc;
}

void volume_close(struct volume *v) {
    if (!v) return;
    wal_close(&v->wal);
    if (v->cache_fd >= 0) close(v->cache_fd);
    if (v->pressure_efd >= 0) close(v->pressure_efd);
    if (v->miss_efd >= 0) close(v->miss_efd);
    if (v->miss_buckets) {
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
    }
    free(v->miss_queue);
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

static int replay_apply(void *ctx, const struct wal_record *r, struct wal_segment *seg, uint64_t data_off) {
    return apply_record(ctx, r, seg, data_off);
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
    if (atomic_load(&v->read_only)) return -EROFS;
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

/* ---------- read misses (caller holds idx_mu; takes miss_mu) ---------- */

static struct miss_entry **miss_bucket(struct volume *v, uint64_t lba) {
    return &v->miss_buckets[(lba * 0x9E3779B97F4A7C15ULL) >> 52 & (MISS_BUCKETS - 1)];
}

/* Queue lba for the fetcher unless it is already waiting; park w on it if
 * given. -ENOMEM leaves nothing half-registered. */
static int miss_register(struct volume *v, uint64_t lba, struct miss_waiter *w) {
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
        uint64_t one = 1;
        ssize_t n = write(v->miss_efd, &one, sizeof one);
        (void)n;
    }
    if (w) { w->next = e->waiters; e->waiters = w; }
out:
    pthread_mutex_unlock(&v->miss_mu);
    return rc;
}

static struct miss_waiter *miss_resolve(struct volume *v, uint64_t lba) {
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

static void miss_fire(struct miss_waiter *ws, int err) {
    while (ws) {
        struct miss_waiter *nx = ws->next;
        ws->done(ws, err);
        ws = nx;
    }
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
                int rc = miss_register(v, lba + i, first_miss < 0 ? w : NULL);
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

/* ---------- checkpoint ---------- */

struct wb_item {
    uint64_t lba;
    uint64_t off;
    struct wal_segment *seg;
    uint8_t kind;
};

struct wb_list {
    struct wb_item *items;
    size_t n, cap;
    uint64_t done_upto; /* written_back_seq: versions <= this are in the cache file already */
};

static int collect_wb(void *ctx, uint64_t lba, const struct block_version *ver) {
    struct wb_list *l = ctx;
    /* The newest version <= cut is also the newest <= done_upto, so an earlier
     * write-back copied it and, the block being DIRTY since, nothing has
     * touched that copy. A flush retried while the store is down would
     * otherwise rewrite everything on every attempt. */
    if (ver->seq <= l->done_upto) return 0;
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 1024;
        struct wb_item *ni = realloc(l->items, nc * sizeof *ni);
        if (!ni) return -ENOMEM;
        l->items = ni;
        l->cap = nc;
    }
    l->items[l->n++] = (struct wb_item){lba, ver->off, ver->seg, ver->kind};
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
        struct wb_item *it = &l->items[i];
        uint64_t coff = it->lba * GLIDE_BLOCK_SIZE;
        if (it->kind == WAL_KIND_DATA) {
            /* Items are sorted by lba: a run of blocks that sit back to back in
             * one segment (a sequential write) is one read and one write. */
            size_t n = 1;
            while (i + n < l->n && n < WB_RUN_BLOCKS && l->items[i + n].kind == WAL_KIND_DATA &&
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
static int sync_installs(struct volume *v, uint64_t seen) {
    if (seen == v->synced_installs) return 0;
    if (fdatasync(v->cache_fd) < 0) return -errno;
    v->synced_installs = seen;
    return 0;
}

/* Steps 1 and 2 of a checkpoint: after them the synced cache file holds each
 * block's newest version <= cut. The blocks stay DIRTY (their versions stay in
 * the index), so nothing reads the copies yet, and neither eviction nor an
 * install touches a DIRTY block: the copies stay valid until a checkpoint up
 * to `cut` drops the versions. Caller holds ckpt_mu. */
static int write_back_upto_locked(struct volume *v, uint64_t cut, struct checkpoint_stats *st) {
    if (cut <= v->written_back_seq) return 0;
    /* 1. the records being written back must be durable before the cache file
     *    holds anything derived from them */
    int rc = wal_sync_wait(&v->wal, cut);
    if (rc) return rc;

    /* 2. copy each block's newest version <= cut into the cache file; the
     *    blocks stay DIRTY meanwhile, so readers keep using the WAL */
    struct wb_list l = {.done_upto = v->written_back_seq};
    pthread_mutex_lock(&v->idx_mu);
    rc = block_index_visit_upto(v->bi, cut, collect_wb, &l);
    pthread_mutex_unlock(&v->idx_mu);
    if (!rc) {
        qsort(l.items, l.n, sizeof *l.items, cmp_wb);
        rc = write_back(v, &l, st);
    }
    free(l.items);
    if (rc) { set_failed(v, -rc); return rc; }
    crash_point("checkpoint-after-writeback");
    uint64_t installs = atomic_load(&v->installs);
    if (fdatasync(v->cache_fd) < 0) { rc = -errno; set_failed(v, errno); return rc; }
    v->synced_installs = installs;
    v->written_back_seq = cut;
    crash_point("checkpoint-after-cache-sync");
    return 0;
}

/* Takes ckpt_mu and the cut both halves of a checkpoint work up to: the
 * sealed end of the WAL, or `upto` if earlier. On error ckpt_mu is not held. */
static int lock_and_cut(struct volume *v, uint64_t upto, struct checkpoint_stats *st, uint64_t *cut) {
    memset(st, 0, sizeof *st);
    int rc = atomic_load(&v->failed);
    if (rc) return -rc;
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

int volume_write_back(struct volume *v, uint64_t upto, struct checkpoint_stats *st) {
    uint64_t cut;
    int rc = lock_and_cut(v, upto, st, &cut);
    if (rc) return rc;
    if (cut > v->checkpoint_seq) rc = write_back_upto_locked(v, cut, st);
    pthread_mutex_unlock(&v->ckpt_mu);
    return rc;
}

int volume_checkpoint(struct volume *v, uint64_t upto, struct checkpoint_stats *st) {
    uint64_t cut;
    int rc = lock_and_cut(v, upto, st, &cut);
    if (rc) return rc;
    if (cut <= v->checkpoint_seq) {
        /* Nothing to write back, but REMOTE bits set since the last state
         * file (a cold open marking what the store holds) must still be made
         * durable: a restart that forgot them would read those blocks as zeros. */
        pthread_mutex_lock(&v->idx_mu);
        int changed = v->remote_changed;
        struct state_image img = {0};
        uint64_t installs = 0;
        if (changed) {
            rc = encode_state(v, &img);
            installs = atomic_load(&v->installs);
            if (!rc) v->remote_changed = 0;
        }
        pthread_mutex_unlock(&v->idx_mu);
        if (!changed || rc) goto out;
        rc = sync_installs(v, installs);
        if (!rc) rc = write_state_file(v, &img, v->checkpoint_seq, &st->state_bytes);
        else free(img.buf);
        if (rc) set_failed(v, -rc);
        goto out;
    }
    crash_point("checkpoint-after-cut");

    /* 1-2. unless volume_write_back already did it up to this cut */
    rc = write_back_upto_locked(v, cut, st);
    if (rc) goto out;

    /* 3. forget versions <= cut and snapshot the base states as of cut */
    uint64_t installs;
    struct state_image img;
    pthread_mutex_lock(&v->idx_mu);
    uint64_t before = block_index_version_count(v->bi);
    block_index_drop_upto(v->bi, cut);
    atomic_fetch_sub(&v->nversions, before - block_index_version_count(v->bi));
    rc = encode_state(v, &img);
    installs = atomic_load(&v->installs);
    if (!rc) v->remote_changed = 0;
    pthread_mutex_unlock(&v->idx_mu);
    /* Dropped versions with no state file written are harmless: the blocks'
     * data is in the synced cache file and the WAL still holds them all. */
    if (rc) goto out;

    /* 4. persist, then the WAL up to cut is no longer needed */
    rc = sync_installs(v, installs);
    if (!rc) rc = write_state_file(v, &img, cut, &st->state_bytes);
    else free(img.buf);
    if (rc) { set_failed(v, -rc); goto out; }
    crash_point("checkpoint-after-state");
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

/* ---------- the object-store side ---------- */

void volume_set_remote(struct volume *v, uint64_t lba, uint64_t n, int on) {
    if (lba >= v->nblocks) return;
    if (n > v->nblocks - lba) n = v->nblocks - lba;
    pthread_mutex_lock(&v->idx_mu);
    for (uint64_t i = 0; i < n; i++) block_index_set_remote(v->bi, lba + i, on);
    v->remote_changed = 1;
    pthread_mutex_unlock(&v->idx_mu);
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

/* ---------- eviction ---------- */

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
    const uint64_t limit = 2 * v->nblocks;
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
                h = h + 1 == v->nblocks ? 0 : h + 1;
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

int volume_flush_cut(struct volume *v, uint64_t *cut) {
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
    for (uint64_t lba = 0; lba < v->nblocks && !rc; lba++) {
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

void volume_set_read_only(struct volume *v) {
    pthread_mutex_lock(&v->wal.mu);
    atomic_store(&v->read_only, 1);
    pthread_cond_broadcast(&v->space_cv); /* writers waiting for budget fail now */
    pthread_mutex_unlock(&v->wal.mu);
}
