/* wal.c — segments, append, group commit and replay (see wal.h for the invariants). */
#define _GNU_SOURCE
#include "wal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "crash_point.h"
#include "glide_common.h"

void wal_segment_put(struct wal_segment *s) {
    if (atomic_fetch_sub(&s->refs, 1) == 1) {
        close(s->fd);
        free(s);
    }
}

static int create_segment(struct wal *w, uint64_t start_seq, struct wal_segment **out) {
    struct wal_segment *s = calloc(1, sizeof *s);
    if (!s) return -ENOMEM;
    s->id = w->next_seg_id++;
    s->start_seq = start_seq;
    s->end_seq = start_seq - 1;
    atomic_init(&s->refs, 1);
    snprintf(s->path, sizeof s->path, "%s/%016llx.seg", w->dir, (unsigned long long)s->id);
    s->fd = -1;
    /* Reuse a retired file when there is one. If we crash between the rename
     * and the new header reaching the disk, replay sees a header whose id does
     * not match the name and treats the file as an undurable tail. */
    while (w->nfree > 0 && s->fd < 0) {
        const char *fp = w->free_paths[--w->nfree];
        if (rename(fp, s->path) == 0) {
            s->fd = open(s->path, O_RDWR | O_CLOEXEC);
            crash_point("wal-after-recycle-rename");
        } else {
            unlink(fp);
        }
    }
    if (s->fd < 0) s->fd = open(s->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (s->fd < 0) { int e = -errno; free(s); return e; }
    uint8_t hdr[WAL_SEG_HDR_SIZE];
    struct wal_segment_header h = {.version = WAL_FORMAT_VERSION, .seg_id = s->id, .start_seq = start_seq};
    memcpy(h.volume_id, w->volume_id, 16);
    wal_segment_header_encode(hdr, &h);
    if (pwrite(s->fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr) {
        int e = errno ? -errno : -EIO;
        close(s->fd); unlink(s->path); free(s);
        return e;
    }
    /* The file must exist after a power loss before any record in it is
     * acknowledged: make the directory entry durable now. */
    if (fsync(w->dir_fd) < 0) {
        int e = -errno;
        close(s->fd); unlink(s->path); free(s);
        return e;
    }
    s->size = WAL_SEG_HDR_SIZE;
    s->needs_sync = 1;
    *out = s;
    return 0;
}

static void link_segment(struct wal *w, struct wal_segment *s) {
    if (w->tail) w->tail->next = s; else w->head = s;
    w->tail = s;
    w->live_bytes += s->size;
}

int wal_append_locked(struct wal *w, uint8_t kind, uint64_t lba, uint32_t nblocks, const void *data,
                      struct wal_append_result *out) {
    struct wal_record r = {.kind = kind, .seq = w->next_seq, .lba = lba, .nblocks = nblocks};
    uint64_t dlen = wal_record_data_len(&r);
    uint64_t need = WAL_REC_HDR_SIZE + dlen;
    struct wal_segment *s = w->tail;
    if (s->size + need > w->seg_size && s->end_seq >= s->start_seq) {
        struct wal_segment *ns;
        int rc = create_segment(w, w->next_seq, &ns);
        if (rc) return rc;
        link_segment(w, ns);
        s = ns;
    }
    uint8_t hdr[WAL_REC_HDR_SIZE];
    wal_record_encode(hdr, &r, data);
    struct iovec iov[2] = {{hdr, sizeof hdr}, {(void *)data, (size_t)dlen}};
    uint64_t off = s->size, done = 0;
    int iovcnt = dlen ? 2 : 1;
    while (done < need) {
        /* A short write leaves the tail where it was: the next append
         * overwrites the partial bytes, and replay would stop at them anyway. */
        ssize_t n = pwritev(s->fd, iov, iovcnt, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return -EIO;
        done += (uint64_t)n;
        size_t adv = (size_t)n;
        while (iovcnt && adv >= iov[0].iov_len) { adv -= iov[0].iov_len; iov[0] = iov[1]; iovcnt--; }
        if (iovcnt) { iov[0].iov_base = (char *)iov[0].iov_base + adv; iov[0].iov_len -= adv; }
    }
    s->size += need;
    s->end_seq = r.seq;
    s->needs_sync = 1;
    w->live_bytes += need;
    w->next_seq++;
    out->seq = r.seq;
    out->seg = s;
    out->data_off = off + WAL_REC_HDR_SIZE;
    return 0;
}

int wal_cut_locked(struct wal *w, uint64_t *cut) {
    *cut = w->next_seq - 1;
    struct wal_segment *s = w->tail;
    if (s->end_seq < s->start_seq) return 0; /* active segment is empty */
    struct wal_segment *ns;
    int rc = create_segment(w, w->next_seq, &ns);
    if (rc) return rc;
    link_segment(w, ns);
    return 0;
}

uint64_t wal_last_seq(struct wal *w) {
    pthread_mutex_lock(&w->mu);
    uint64_t s = w->next_seq - 1;
    pthread_mutex_unlock(&w->mu);
    return s;
}

void wal_retire_upto(struct wal *w, uint64_t seq) {
    pthread_mutex_lock(&w->mu);
    while (w->head && w->head != w->tail && w->head->end_seq <= seq) {
        struct wal_segment *s = w->head;
        w->head = s->next;
        w->live_bytes -= s->size;
        int kept = 0;
        if (w->nfree < WAL_RECYCLE_MAX) {
            char fp[sizeof w->free_paths[0]];
            snprintf(fp, sizeof fp, "%s/%016llx.free", w->dir, (unsigned long long)s->id);
            if (rename(s->path, fp) == 0) {
                memcpy(w->free_paths[w->nfree++], fp, sizeof fp);
                kept = 1;
            }
        }
        if (!kept) unlink(s->path);
        wal_segment_put(s);
    }
    pthread_mutex_unlock(&w->mu);
}

/* ---- group commit ---- */

static void complete_ready(struct wal *w, int err) {
    /* called with sync_mu held; unlinks the ready waiters, calls them unlocked */
    struct wal_waiter *ready = NULL, **link = &w->waiters;
    while (*link) {
        struct wal_waiter *x = *link;
        if (err || x->target <= w->synced_seq) {
            *link = x->next;
            x->next = ready;
            ready = x;
        } else {
            link = &x->next;
        }
    }
    if (!ready) return;
    pthread_mutex_unlock(&w->sync_mu);
    while (ready) {
        struct wal_waiter *nx = ready->next;
        ready->done(ready, err);
        ready = nx;
    }
    pthread_mutex_lock(&w->sync_mu);
}

static void *sync_main(void *arg) {
    struct wal *w = arg;
    pthread_mutex_lock(&w->sync_mu);
    for (;;) {
        complete_ready(w, w->sync_error);
        if (!w->waiters) {
            if (w->stopping) break;
            pthread_cond_wait(&w->sync_cv, &w->sync_mu);
            continue;
        }
        pthread_mutex_unlock(&w->sync_mu);

        /* Everything appended so far is in the page cache; one fdatasync per
         * segment that holds unsynced records makes it all durable. */
        struct wal_segment *todo[64];
        int n = 0, more = 0;
        pthread_mutex_lock(&w->mu);
        uint64_t target = w->next_seq - 1;
        for (struct wal_segment *s = w->head; s; s = s->next) {
            if (!s->needs_sync) continue;
            if (n == 64) { more = 1; break; }
            s->needs_sync = 0;
            wal_segment_get(s);
            todo[n++] = s;
        }
        pthread_mutex_unlock(&w->mu);
        int err = 0;
        for (int i = 0; i < n; i++) {
            if (!err && fdatasync(todo[i]->fd) < 0) err = errno ? errno : EIO;
            wal_segment_put(todo[i]);
        }
        atomic_fetch_add(&w->syncs, 1);

        pthread_mutex_lock(&w->sync_mu);
        if (err) w->sync_error = err;
        else if (!more && target > w->synced_seq) w->synced_seq = target;
    }
    pthread_mutex_unlock(&w->sync_mu);
    return NULL;
}

void wal_sync_async(struct wal *w, struct wal_waiter *waiter) {
    pthread_mutex_lock(&w->sync_mu);
    if (w->sync_error || waiter->target <= w->synced_seq) {
        int err = w->sync_error;
        pthread_mutex_unlock(&w->sync_mu);
        waiter->done(waiter, err);
        return;
    }
    waiter->next = w->waiters;
    w->waiters = waiter;
    pthread_cond_signal(&w->sync_cv);
    pthread_mutex_unlock(&w->sync_mu);
}

struct blocking_waiter {
    struct wal_waiter base;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, err;
};

static void blocking_done(struct wal_waiter *ww, int err) {
    struct blocking_waiter *b = (struct blocking_waiter *)ww;
    pthread_mutex_lock(&b->mu);
    b->done = 1;
    b->err = err;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

int wal_sync_wait(struct wal *w, uint64_t target) {
    struct blocking_waiter b = {.base = {.target = target, .done = blocking_done}};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    wal_sync_async(w, &b.base);
    pthread_mutex_lock(&b.mu);
    while (!b.done) pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cv);
    return b.err ? -b.err : 0;
}

/* ---- open and replay ---- */

/* Spare files from the previous run are not adopted: they are cheap to lose,
 * and starting without them keeps open simple. */
static void remove_free_files(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len > 5 && strcmp(e->d_name + len - 5, ".free") == 0) {
            char p[4096 + 300];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
    }
    closedir(d);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int list_segment_ids(const char *dir, uint64_t **ids, size_t *n) {
    DIR *d = opendir(dir);
    if (!d) return -errno;
    size_t cap = 16;
    *n = 0;
    *ids = malloc(cap * sizeof **ids);
    if (!*ids) { closedir(d); return -ENOMEM; }
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len != 20 || strcmp(e->d_name + 16, ".seg") != 0) continue;
        char *end;
        unsigned long long id = strtoull(e->d_name, &end, 16);
        if (end != e->d_name + 16) continue;
        if (*n == cap) {
            uint64_t *ni = realloc(*ids, cap * 2 * sizeof *ni);
            if (!ni) { closedir(d); return -ENOMEM; }
            *ids = ni;
            cap *= 2;
        }
        (*ids)[(*n)++] = id;
    }
    closedir(d);
    qsort(*ids, *n, sizeof **ids, cmp_u64);
    return 0;
}

/* Reads s's records from s->size (the end of the last valid one) into the
 * replay callback and advances s->size, w->expect and the stats. Stops without
 * error at the first record that is short, invalid or out of sequence: a torn
 * tail, a recycled file's older records, or (passive) one still being written. */
static int replay_segment(struct wal *w, struct wal_segment *s, uint8_t *buf, struct wal_replay_stats *st) {
    struct stat sb;
    if (fstat(s->fd, &sb) < 0) return -errno;
    uint64_t file_size = (uint64_t)sb.st_size, off = s->size;
    int rc = 0;
    for (;;) {
        if (off + WAL_REC_HDR_SIZE > file_size) break;
        if (pread(s->fd, buf, WAL_REC_HDR_SIZE, (off_t)off) != WAL_REC_HDR_SIZE) break;
        struct wal_record r;
        if (wal_record_decode_header(buf, WAL_REC_HDR_SIZE, &r) != WAL_DECODE_OK) break;
        uint64_t dlen = wal_record_data_len(&r);
        if (off + WAL_REC_HDR_SIZE + dlen > file_size) break;
        if (dlen && pread(s->fd, buf + WAL_REC_HDR_SIZE, (size_t)dlen, (off_t)(off + WAL_REC_HDR_SIZE)) != (ssize_t)dlen)
            break;
        if (wal_record_check(buf, &r, buf + WAL_REC_HDR_SIZE) != WAL_DECODE_OK) break;
        if (r.seq != w->expect) break;
        st->records++;
        if (r.seq > w->checkpoint_seq) {
            rc = w->replay_fn(w->replay_ctx, &r, s, off + WAL_REC_HDR_SIZE);
            if (rc) break;
            st->applied++;
        }
        s->end_seq = r.seq;
        st->last_seq = r.seq;
        w->expect++;
        off += WAL_REC_HDR_SIZE + dlen;
        st->bytes += WAL_REC_HDR_SIZE + dlen;
    }
    w->live_bytes += off - s->size;
    s->size = off;
    return rc;
}

static void discard_file(const char *path, struct wal_replay_stats *st) {
    struct stat sb;
    if (stat(path, &sb) == 0) st->discarded_bytes += (uint64_t)sb.st_size;
    unlink(path);
}

/* Opens a segment file and reads its header: 0 valid (for this name), 1 not
 * (never made durable, a recycled file whose new header is not written yet,
 * or empty), -errno when it cannot be opened. */
static int open_segment(const char *path, uint64_t id, int *fd, struct wal_segment_header *h) {
    *fd = open(path, O_RDWR | O_CLOEXEC);
    if (*fd < 0) return -errno;
    uint8_t hb[WAL_SEG_HDR_SIZE];
    if (pread(*fd, hb, sizeof hb, 0) != (ssize_t)sizeof hb || wal_segment_header_decode(hb, sizeof hb, h) != WAL_DECODE_OK ||
        h->seg_id != id)
        return 1;
    return 0;
}

/* Cuts off the bytes after each segment's last valid record (a torn tail, or
 * a recycled file's old records) so they can never be mistaken for records
 * later. Only when nobody else appends: an ordinary open, or an activation. */
static int truncate_tails(struct wal *w, struct wal_replay_stats *st) {
    for (struct wal_segment *s = w->head; s; s = s->next) {
        struct stat sb;
        if (fstat(s->fd, &sb) < 0) return -errno;
        if ((uint64_t)sb.st_size <= s->size) continue;
        st->discarded_bytes += (uint64_t)sb.st_size - s->size;
        if (ftruncate(s->fd, (off_t)s->size) < 0 || fdatasync(s->fd) < 0) return -errno;
    }
    return 0;
}

/* Replays from the remembered position: the rest of the tail segment, then
 * each later segment (ids only grow) that starts exactly at the expected
 * sequence. The first one that does not is, with `final`, a break: it and
 * everything after it were never durable (a sync covers all earlier records
 * first) and are deleted, as at any open. Without `final` (another process
 * is appending) it is "not yet", and the files are left alone. Caller holds
 * mu or owns w alone. */
static int advance(struct wal *w, int final, struct wal_replay_stats *st, char *errmsg, size_t errlen) {
    uint64_t *ids = NULL;
    size_t nids = 0;
    int rc = list_segment_ids(w->dir, &ids, &nids);
    uint8_t *buf = rc ? NULL : malloc((size_t)WAL_REC_HDR_SIZE + GLIDE_MAX_IO);
    if (!rc && !buf) rc = -ENOMEM;
    int stopped = 0;
    for (size_t i = 0; i < nids && !rc; i++) {
        if (ids[i] >= w->next_seg_id) w->next_seg_id = ids[i] + 1;
        if (w->tail && ids[i] <= w->tail->id) continue;
        char path[sizeof((struct wal_segment *)0)->path];
        snprintf(path, sizeof path, "%s/%016llx.seg", w->dir, (unsigned long long)ids[i]);
        if (stopped) { discard_file(path, st); continue; }
        int fd;
        struct wal_segment_header h;
        int bad = open_segment(path, ids[i], &fd, &h);
        if (bad < 0) { rc = bad; break; }
        /* The writer creates a segment only after every record of the one
         * before it is complete: having seen this header, the rest of the
         * tail read now is all there will be. */
        if (w->tail) rc = replay_segment(w, w->tail, buf, st);
        if (rc) { close(fd); break; }
        if (bad || (w->expect && h.start_seq != w->expect)) {
            close(fd);
            if (!final) break;
            discard_file(path, st);
            stopped = 1;
            continue;
        }
        if (memcmp(h.volume_id, w->volume_id, 16) != 0) {
            close(fd);
            snprintf(errmsg, errlen, "WAL segment %s belongs to another volume", path);
            rc = -EUCLEAN;
            break;
        }
        if (!w->expect) {
            if (h.start_seq > w->checkpoint_seq + 1) {
                close(fd);
                snprintf(errmsg, errlen,
                         "WAL gap: checkpoint is at seq %llu but the oldest segment %s starts at %llu; "
                         "records in between are missing",
                         (unsigned long long)w->checkpoint_seq, path, (unsigned long long)h.start_seq);
                rc = -EUCLEAN;
                break;
            }
            w->expect = h.start_seq;
        }
        struct wal_segment *s = calloc(1, sizeof *s);
        if (!s) { close(fd); rc = -ENOMEM; break; }
        s->fd = fd;
        s->id = h.seg_id;
        s->start_seq = h.start_seq;
        s->end_seq = h.start_seq - 1;
        s->size = WAL_SEG_HDR_SIZE;
        atomic_init(&s->refs, 1);
        snprintf(s->path, sizeof s->path, "%s", path);
        link_segment(w, s);
        st->segments++;
    }
    if (!rc && w->tail) rc = replay_segment(w, w->tail, buf, st);
    if (!rc && final) rc = truncate_tails(w, st);
    free(buf);
    free(ids);
    uint64_t last = st->last_seq > w->checkpoint_seq ? st->last_seq : w->checkpoint_seq;
    w->next_seq = last + 1;
    return rc;
}

/* After the last replay: the new active segment, everything replayed counted
 * as durable, group commit running. */
static int start_active(struct wal *w) {
    struct wal_segment *active;
    int rc = create_segment(w, w->next_seq, &active);
    if (rc) return rc;
    link_segment(w, active);
    w->synced_seq = w->next_seq - 1; /* everything replayed is on disk */
    if (pthread_create(&w->sync_thread, NULL, sync_main, w) != 0) return -EAGAIN;
    w->sync_started = 1;
    w->passive = 0;
    return 0;
}

static int open_common(struct wal *w, const char *dir, const uint8_t volume_id[16], uint64_t seg_size,
                       uint64_t checkpoint_seq, int passive, wal_replay_fn fn, void *ctx,
                       struct wal_replay_stats *st, char *errmsg, size_t errlen) {
    memset(w, 0, sizeof *w);
    memset(st, 0, sizeof *st);
    snprintf(w->dir, sizeof w->dir, "%s", dir);
    memcpy(w->volume_id, volume_id, 16);
    w->seg_size = seg_size;
    w->passive = passive;
    w->checkpoint_seq = checkpoint_seq;
    w->replay_fn = fn;
    w->replay_ctx = ctx;
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_init(&w->sync_mu, NULL);
    pthread_cond_init(&w->sync_cv, NULL);
    w->next_seg_id = 1;
    if (!passive && mkdir(dir, 0700) < 0 && errno != EEXIST) return -errno;
    w->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (w->dir_fd < 0) return -errno;
    if (passive) return advance(w, 0, st, errmsg, errlen);
    remove_free_files(dir);
    int rc = advance(w, 1, st, errmsg, errlen);
    return rc ? rc : start_active(w);
}

int wal_open(struct wal *w, const char *dir, const uint8_t volume_id[16], uint64_t seg_size,
             uint64_t checkpoint_seq, wal_replay_fn fn, void *ctx, struct wal_replay_stats *st,
             char *errmsg, size_t errlen) {
    return open_common(w, dir, volume_id, seg_size, checkpoint_seq, 0, fn, ctx, st, errmsg, errlen);
}

int wal_open_passive(struct wal *w, const char *dir, const uint8_t volume_id[16], uint64_t seg_size,
                     uint64_t checkpoint_seq, wal_replay_fn fn, void *ctx, struct wal_replay_stats *st,
                     char *errmsg, size_t errlen) {
    return open_common(w, dir, volume_id, seg_size, checkpoint_seq, 1, fn, ctx, st, errmsg, errlen);
}

int wal_catch_up(struct wal *w, struct wal_replay_stats *st, char *errmsg, size_t errlen) {
    pthread_mutex_lock(&w->mu);
    int rc = w->passive ? advance(w, 0, st, errmsg, errlen) : -EINVAL;
    pthread_mutex_unlock(&w->mu);
    return rc;
}

int wal_activate(struct wal *w, struct wal_replay_stats *st, char *errmsg, size_t errlen) {
    pthread_mutex_lock(&w->mu);
    int rc = w->passive ? advance(w, 1, st, errmsg, errlen) : -EINVAL;
    if (!rc) {
        remove_free_files(w->dir);
        rc = start_active(w);
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

void wal_close(struct wal *w) {
    if (w->sync_started) {
        pthread_mutex_lock(&w->sync_mu);
        w->stopping = 1;
        pthread_cond_signal(&w->sync_cv);
        pthread_mutex_unlock(&w->sync_mu);
        pthread_join(w->sync_thread, NULL);
        w->sync_started = 0;
    }
    struct wal_segment *s = w->head;
    while (s) {
        struct wal_segment *nx = s->next;
        wal_segment_put(s);
        s = nx;
    }
    w->head = w->tail = NULL;
    w->nfree = 0;
    if (w->dir_fd >= 0) close(w->dir_fd);
    w->dir_fd = -1;
}
