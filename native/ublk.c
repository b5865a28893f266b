/* ublk.c — ublk control commands and queue threads (see ublk.h). */
#define _GNU_SOURCE
#include "ublk.h"

#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "glide_common.h"
#include "ublk_uapi.h"
#include "volume.h"

#define CTRL_DEV "/dev/ublk-control"
#define EVENT_TAG UINT64_MAX

struct ublk_queue;

/* A tag waiting for the WAL's group commit (FLUSH, FUA) or for a block from
 * the object store (READ); never both at once. */
struct ublk_pending {
    struct wal_waiter w; /* first: cast back from the waiter */
    struct miss_waiter mw;
    struct ublk_queue *q;
    int tag;
    int result;
    int is_miss;
    int op;        /* metrics: enum io_op of the tag's request */
    uint64_t t0;   /* metrics: when it was fetched (kept across re-runs) */
    uint64_t len;
    struct ublk_pending *next;
};

struct ublk_queue {
    struct ublk_device *d;
    int q_id;
    struct io_uring ring;
    int ring_ok;
    struct ublksrv_io_desc *descs;
    size_t descs_len;
    uint8_t *bufs;
    size_t bufs_len;
    int efd;
    pthread_t thread;
    int thread_ok;
    pthread_mutex_t mu; /* done list, pending count */
    struct ublk_pending *done;
    int pending;
    struct ublk_pending *pend; /* one per tag: a tag has at most one request */
    int stop;
    int setup_err;
};

struct ublk_device {
    struct volume *v;
    struct ublk_config cfg;
    int dev_id;
    int char_fd;
    struct ublk_queue *queues;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ready; /* queues that submitted their fetches (or failed) */
};

/* ---------- control commands ---------- */

struct ctrl {
    int fd;
    struct io_uring ring;
};

static int ctrl_open(struct ctrl *c, char *err, size_t errlen) {
    c->fd = open(CTRL_DEV, O_RDWR | O_CLOEXEC);
    if (c->fd < 0) {
        int e = errno;
        if (e == ENOENT)
            snprintf(err, errlen, "%s does not exist: the ublk_drv module is not loaded "
                     "(modprobe ublk_drv; needs Linux >= 6.0 with CONFIG_BLK_DEV_UBLK)", CTRL_DEV);
        else if (e == EACCES || e == EPERM)
            snprintf(err, errlen, "cannot open %s: permission denied (ublk needs root)", CTRL_DEV);
        else
            snprintf(err, errlen, "cannot open %s: %s", CTRL_DEV, strerror(e));
        return -e;
    }
    int rc = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
    if (rc < 0) {
        snprintf(err, errlen, "io_uring with 128-byte SQEs is not available: %s", strerror(-rc));
        close(c->fd);
        return rc;
    }
    return 0;
}

static void ctrl_close(struct ctrl *c) {
    io_uring_queue_exit(&c->ring);
    close(c->fd);
}

static int ctrl_cmd(struct ctrl *c, uint32_t op, uint32_t dev_id, uint64_t data0, void *buf, uint16_t len) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
    if (!sqe) return -EBUSY;
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = c->fd;
    sqe->cmd_op = op;
    struct ublksrv_ctrl_cmd cmd = {.dev_id = dev_id, .queue_id = (uint16_t)-1, .len = len,
                                   .addr = (uint64_t)(uintptr_t)buf, .data = {data0}};
    memcpy(sqe->cmd, &cmd, sizeof cmd);
    int rc = io_uring_submit(&c->ring);
    if (rc < 0) return rc;
    struct io_uring_cqe *cqe;
    rc = io_uring_wait_cqe(&c->ring, &cqe);
    if (rc < 0) return rc;
    rc = cqe->res;
    io_uring_cqe_seen(&c->ring, cqe);
    return rc;
}

int ublk_probe(char *msg, size_t len) {
    struct ctrl c;
    int rc = ctrl_open(&c, msg, len);
    if (rc) return rc;
    uint64_t features = 0;
    rc = ctrl_cmd(&c, UBLK_U_CMD_GET_FEATURES, 0, 0, &features, sizeof features);
    ctrl_close(&c);
    if (rc < 0) {
        snprintf(msg, len, "the ublk driver does not answer GET_FEATURES (%s): kernel too old, need >= 6.5",
                 strerror(-rc));
        return rc;
    }
    uint64_t need = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_CMD_IOCTL_ENCODE;
    if ((features & need) != need) {
        snprintf(msg, len, "the ublk driver lacks user recovery with reissue (features %#llx)",
                 (unsigned long long)features);
        return -EOPNOTSUPP;
    }
    snprintf(msg, len, "ublk available (features %#llx)", (unsigned long long)features);
    return 0;
}

/* Whether this kernel resizes a live device (UBLK_U_CMD_UPDATE_SIZE, Linux
 * 6.16+). Asked through GET_FEATURES, so an older kernel is never sent a
 * command it does not know. */
static int can_update_size(struct ctrl *c) {
    uint64_t features = 0;
    return ctrl_cmd(c, UBLK_U_CMD_GET_FEATURES, 0, 0, &features, sizeof features) == 0 &&
           (features & UBLK_F_UPDATE_SIZE);
}

static int update_size(struct ctrl *c, int dev_id, uint64_t size, char *err, size_t errlen) {
    int rc = ctrl_cmd(c, UBLK_U_CMD_UPDATE_SIZE, (uint32_t)dev_id, size >> 9, NULL, 0);
    if (rc == -EOPNOTSUPP) return 0; /* advertised but refused: treat as absent */
    if (rc < 0) {
        snprintf(err, errlen, "UPDATE_SIZE on ublk device %d: %s", dev_id, strerror(-rc));
        return rc;
    }
    return 1;
}

int ublk_update_size(struct ublk_device *d, char *err, size_t errlen) {
    err[0] = 0;
    struct ctrl c;
    int rc = ctrl_open(&c, err, errlen);
    if (rc) return rc;
    rc = can_update_size(&c) ? update_size(&c, d->dev_id, d->v->size, err, errlen) : 0;
    ctrl_close(&c);
    return rc;
}

/* ---------- queue threads ---------- */

/* The ring has room for every tag's command plus the event poll, so a full SQ
 * only means "not submitted yet": submit and take the freed slot. */
static struct io_uring_sqe *queue_sqe(struct ublk_queue *q) {
    struct io_uring_sqe *sqe;
    while (!(sqe = io_uring_get_sqe(&q->ring))) io_uring_submit(&q->ring);
    return sqe;
}

static void prep_io_cmd(struct ublk_queue *q, int tag, uint32_t op, int result) {
    struct io_uring_sqe *sqe = queue_sqe(q);
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = q->d->char_fd;
    sqe->cmd_op = op;
    struct ublksrv_io_cmd cmd = {.q_id = (uint16_t)q->q_id, .tag = (uint16_t)tag, .result = result,
                                 .addr = (uint64_t)(uintptr_t)(q->bufs + (size_t)tag * q->d->cfg.max_io_bytes)};
    memcpy(sqe->cmd, &cmd, sizeof cmd);
    sqe->user_data = (uint64_t)tag;
}

static void arm_event(struct ublk_queue *q) {
    struct io_uring_sqe *sqe = queue_sqe(q);
    io_uring_prep_poll_add(sqe, q->efd, POLLIN);
    sqe->user_data = EVENT_TAG;
}

static void pending_done(struct ublk_pending *p) {
    struct ublk_queue *q = p->q;
    uint64_t one = 1;
    pthread_mutex_lock(&q->mu);
    p->next = q->done;
    q->done = p;
    ssize_t n = write(q->efd, &one, sizeof one);
    (void)n;
    pthread_mutex_unlock(&q->mu);
}

static void durable_done(struct wal_waiter *w, int err) {
    struct ublk_pending *p = (struct ublk_pending *)w;
    if (err) p->result = -err;
    pending_done(p);
}

static void miss_done(struct miss_waiter *w, int err) {
    struct ublk_pending *p = (struct ublk_pending *)((char *)w - offsetof(struct ublk_pending, mw));
    p->result = err ? -err : 0;
    pending_done(p);
}

static void commit_when_durable(struct ublk_queue *q, int tag, uint64_t seq, int result) {
    struct ublk_pending *p = &q->pend[tag];
    p->is_miss = 0;
    p->w.target = seq;
    p->w.done = durable_done;
    p->q = q;
    p->tag = tag;
    p->result = result;
    pthread_mutex_lock(&q->mu);
    q->pending++;
    pthread_mutex_unlock(&q->mu);
    wal_sync_async(&q->d->v->wal, &p->w);
}

static int errno_result(int rc) { return rc < 0 ? rc : -EIO; }

/* Hands the tag's result back to the kernel; its reply is queued now. */
static void commit(struct ublk_queue *q, int tag, int result) {
    struct ublk_pending *p = &q->pend[tag];
    io_end(q->d->v->io, p->op, p->t0, p->len, result < 0);
    prep_io_cmd(q, tag, UBLK_U_IO_COMMIT_AND_FETCH_REQ, result);
}

static int io_op_of(uint32_t op) {
    switch (op) {
    case UBLK_IO_OP_READ: return IO_READ;
    case UBLK_IO_OP_WRITE: return IO_WRITE;
    case UBLK_IO_OP_FLUSH: return IO_FLUSH;
    case UBLK_IO_OP_DISCARD: return IO_TRIM;
    case UBLK_IO_OP_WRITE_ZEROES: return IO_WRITE_ZEROES;
    default: return IO_UNCOUNTED;
    }
}

/* A request the kernel just fetched to this tag: its latency starts. */
static void begin(struct ublk_queue *q, int tag) {
    const struct ublksrv_io_desc *iod = &q->descs[tag];
    struct ublk_pending *p = &q->pend[tag];
    p->op = io_op_of(iod->op_flags & 0xff);
    p->len = (uint64_t)iod->nr_sectors << 9;
    p->t0 = io_begin(q->d->v->io, p->op);
}

/* Serves one request: commits it now, or once the WAL covers it (FLUSH, FUA). */
static void handle(struct ublk_queue *q, int tag) {
    const struct ublksrv_io_desc *iod = &q->descs[tag];
    struct volume *v = q->d->v;
    uint32_t op = iod->op_flags & 0xff, flags = iod->op_flags >> 8;
    uint64_t off = iod->start_sector << 9, len = (uint64_t)iod->nr_sectors << 9;
    uint8_t *buf = q->bufs + (size_t)tag * q->d->cfg.max_io_bytes;
    uint64_t seq = 0;
    int rc, result;
    switch (op) {
    case UBLK_IO_OP_READ: {
        struct ublk_pending *p = &q->pend[tag];
        p->mw.done = miss_done;
        p->q = q;
        p->tag = tag;
        p->is_miss = 1;
        rc = len > q->d->cfg.max_io_bytes ? -EINVAL : volume_read_or_park(v, off, len, buf, &p->mw);
        if (rc == VOLUME_PARKED) {
            /* other tags go on; this one runs again when its block arrives */
            pthread_mutex_lock(&q->mu);
            q->pending++;
            pthread_mutex_unlock(&q->mu);
            return;
        }
        result = rc ? errno_result(rc) : (int)len;
        break;
    }
    case UBLK_IO_OP_WRITE:
        rc = len > q->d->cfg.max_io_bytes ? -EINVAL : volume_write(v, off, len, buf, &seq);
        result = rc ? errno_result(rc) : (int)len;
        if (!rc && (flags & (UBLK_IO_F_FUA >> 8)) && seq) { commit_when_durable(q, tag, seq, result); return; }
        break;
    case UBLK_IO_OP_FLUSH:
        atomic_fetch_add(&v->st.flushes, 1);
        commit_when_durable(q, tag, wal_last_seq(&v->wal), 0);
        return;
    case UBLK_IO_OP_DISCARD:
        rc = volume_trim(v, off, len, &seq);
        result = rc ? errno_result(rc) : 0;
        break;
    case UBLK_IO_OP_WRITE_ZEROES:
        rc = volume_write_zeroes(v, off, len, (flags & (UBLK_IO_F_NOUNMAP >> 8)) != 0, &seq);
        result = rc ? errno_result(rc) : 0;
        break;
    default:
        result = -EOPNOTSUPP;
    }
    commit(q, tag, result);
}

static void drain_done(struct ublk_queue *q) {
    uint64_t cnt;
    ssize_t n = read(q->efd, &cnt, sizeof cnt);
    (void)n;
    pthread_mutex_lock(&q->mu);
    struct ublk_pending *list = q->done;
    q->done = NULL;
    pthread_mutex_unlock(&q->mu);
    int k = 0;
    for (; list; k++) {
        struct ublk_pending *nx = list->next; /* handle() may re-park the same slot */
        if (list->is_miss && list->result == 0) handle(q, list->tag);
        else commit(q, list->tag, list->result);
        list = nx;
    }
    if (k) {
        pthread_mutex_lock(&q->mu);
        q->pending -= k;
        pthread_mutex_unlock(&q->mu);
    }
}

static void queue_ready(struct ublk_queue *q, int err) {
    pthread_mutex_lock(&q->d->mu);
    q->setup_err = err;
    q->d->ready++;
    pthread_cond_broadcast(&q->d->cv);
    pthread_mutex_unlock(&q->d->mu);
}

static void *queue_main(void *arg) {
    struct ublk_queue *q = arg;
    int depth = q->d->cfg.depth;
    int rc = io_uring_queue_init((unsigned)(depth * 2 + 4), &q->ring, 0);
    if (rc < 0) { queue_ready(q, rc); return NULL; }
    q->ring_ok = 1;
    for (int tag = 0; tag < depth; tag++) prep_io_cmd(q, tag, UBLK_U_IO_FETCH_REQ, 0);
    arm_event(q);
    rc = io_uring_submit(&q->ring);
    queue_ready(q, rc < 0 ? rc : 0);
    if (rc < 0) return NULL;

    int aborted = 0;
    while (aborted < depth) {
        pthread_mutex_lock(&q->mu);
        int stop = q->stop, pending = q->pending;
        pthread_mutex_unlock(&q->mu);
        /* On detach, leave only once no durability waiter points at us. */
        if (stop && pending == 0) break;
        rc = io_uring_submit_and_wait(&q->ring, 1);
        if (rc < 0 && rc != -EINTR) break;
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&q->ring, head, cqe) {
            seen++;
            if (cqe->user_data == EVENT_TAG) {
                drain_done(q);
                arm_event(q);
                continue;
            }
            int tag = (int)cqe->user_data;
            if (cqe->res == UBLK_IO_RES_ABORT || cqe->res < 0) {
                aborted++; /* the device is stopping, or this tag is gone */
                continue;
            }
            if (stop) continue; /* detaching: leave it to be reissued */
            begin(q, tag);
            handle(q, tag);
        }
        io_uring_cq_advance(&q->ring, seen);
    }
    /* However the loop ended (detach, device stopped, ring error), WAL
     * waiters still point into q->pend: they must all have fired before the
     * queue can be freed. Their commits are harmless on a stopped device. */
    for (;;) {
        pthread_mutex_lock(&q->mu);
        int pending = q->pending;
        pthread_mutex_unlock(&q->mu);
        if (!pending) break;
        struct pollfd pfd = {.fd = q->efd, .events = POLLIN};
        poll(&pfd, 1, 1000);
        drain_done(q);
    }
    /* Commits prepared by the last drain still have to reach the kernel.
     * The ring stays open: this thread's exit cancels its remaining fetches
     * (with recovery enabled the kernel requeues their requests for the next
     * daemon), and the joining thread closes the ring afterwards. Closing it
     * here, from a still-running thread, can hang the kernel's quiesce work
     * for good on 6.12 (see ../shared/design/handoff.md). */
    io_uring_submit(&q->ring);
    return NULL;
}

/* ---------- device lifecycle ---------- */

static void free_device(struct ublk_device *d) {
    if (!d) return;
    if (d->queues) {
        for (int i = 0; i < d->cfg.nr_queues; i++) {
            struct ublk_queue *q = &d->queues[i];
            /* Only after every queue thread has exited (stop_queues): rings
             * first, then the descriptor mappings and /dev/ublkcN below. */
            if (q->ring_ok) io_uring_queue_exit(&q->ring);
            q->ring_ok = 0;
            if (q->descs && q->descs != MAP_FAILED) munmap(q->descs, q->descs_len);
            if (q->bufs && q->bufs != MAP_FAILED) munmap(q->bufs, q->bufs_len);
            if (q->efd >= 0) close(q->efd);
            free(q->pend);
            pthread_mutex_destroy(&q->mu);
        }
        free(d->queues);
    }
    if (d->char_fd >= 0) close(d->char_fd);
    free(d);
}

static void stop_queues(struct ublk_device *d) {
    for (int i = 0; i < d->cfg.nr_queues; i++) {
        struct ublk_queue *q = &d->queues[i];
        if (!q->thread_ok) continue;
        pthread_mutex_lock(&q->mu);
        q->stop = 1;
        uint64_t one = 1;
        ssize_t n = write(q->efd, &one, sizeof one);
        (void)n;
        pthread_mutex_unlock(&q->mu);
    }
    for (int i = 0; i < d->cfg.nr_queues; i++) {
        if (d->queues[i].thread_ok) pthread_join(d->queues[i].thread, NULL);
        d->queues[i].thread_ok = 0;
    }
}

static int start_queues(struct ublk_device *d, char *err, size_t errlen) {
    long page = sysconf(_SC_PAGESIZE);
    size_t desc_stride = (((size_t)UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc)) + (size_t)page - 1) &
                         ~((size_t)page - 1);
    d->queues = calloc((size_t)d->cfg.nr_queues, sizeof *d->queues);
    if (!d->queues) return -ENOMEM;
    for (int i = 0; i < d->cfg.nr_queues; i++) {
        struct ublk_queue *q = &d->queues[i];
        q->d = d;
        q->q_id = i;
        q->efd = -1;
        pthread_mutex_init(&q->mu, NULL);
    }
    for (int i = 0; i < d->cfg.nr_queues; i++) {
        struct ublk_queue *q = &d->queues[i];
        q->descs_len = ((size_t)d->cfg.depth * sizeof(struct ublksrv_io_desc) + (size_t)page - 1) & ~((size_t)page - 1);
        q->descs = mmap(NULL, q->descs_len, PROT_READ, MAP_SHARED | MAP_POPULATE, d->char_fd,
                        (off_t)(UBLKSRV_CMD_BUF_OFFSET + (size_t)i * desc_stride));
        if (q->descs == MAP_FAILED) {
            snprintf(err, errlen, "mmap of queue %d descriptors: %s", i, strerror(errno));
            q->descs = NULL;
            return -errno;
        }
        q->bufs_len = (size_t)d->cfg.depth * d->cfg.max_io_bytes;
        q->bufs = mmap(NULL, q->bufs_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        q->pend = calloc((size_t)d->cfg.depth, sizeof *q->pend);
        if (q->bufs == MAP_FAILED || q->efd < 0 || !q->pend) {
            if (q->bufs == MAP_FAILED) q->bufs = NULL;
            snprintf(err, errlen, "allocating queue %d: out of memory", i);
            return -ENOMEM;
        }
        if (pthread_create(&q->thread, NULL, queue_main, q) != 0) return -EAGAIN;
        q->thread_ok = 1;
    }
    pthread_mutex_lock(&d->mu);
    while (d->ready < d->cfg.nr_queues) pthread_cond_wait(&d->cv, &d->mu);
    pthread_mutex_unlock(&d->mu);
    for (int i = 0; i < d->cfg.nr_queues; i++)
        if (d->queues[i].setup_err) {
            snprintf(err, errlen, "queue %d io_uring setup: %s", i, strerror(-d->queues[i].setup_err));
            return d->queues[i].setup_err;
        }
    return 0;
}

static int open_char_dev(struct ublk_device *d, char *err, size_t errlen) {
    char path[64];
    snprintf(path, sizeof path, "/dev/ublkc%d", d->dev_id);
    /* udev (or devtmpfs) creates the node asynchronously */
    for (int i = 0; i < 300; i++) {
        d->char_fd = open(path, O_RDWR | O_CLOEXEC);
        if (d->char_fd >= 0) return 0;
        if (errno != ENOENT) break;
        usleep(10000);
    }
    snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    return -errno;
}

static void fill_params(const struct ublk_device *d, struct ublk_params *p) {
    memset(p, 0, sizeof *p);
    p->len = sizeof *p;
    p->types = UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD;
    /* VOLATILE_CACHE and FUA: without them the kernel never sends FLUSH or
     * FUA, and a guest's fsync would not reach the WAL's fdatasync. */
    p->basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
    p->basic.logical_bs_shift = GLIDE_BLOCK_SHIFT;
    p->basic.physical_bs_shift = GLIDE_BLOCK_SHIFT;
    p->basic.io_opt_shift = GLIDE_BLOCK_SHIFT;
    p->basic.io_min_shift = GLIDE_BLOCK_SHIFT;
    p->basic.max_sectors = d->cfg.max_io_bytes >> 9;
    p->basic.dev_sectors = d->v->size >> 9;
    p->discard.discard_granularity = GLIDE_BLOCK_SIZE;
    p->discard.max_discard_sectors = 1u << 22;
    p->discard.max_write_zeroes_sectors = 1u << 22;
    p->discard.max_discard_segments = 1;
}

int ublk_attach(struct volume *v, const struct ublk_config *cfg, struct ublk_device **out, int *recovered,
                char *err, size_t errlen) {
    err[0] = 0;
    *recovered = 0;
    if (cfg->nr_queues < 1 || cfg->nr_queues > 64 || cfg->depth < 1 || cfg->depth > 1024 ||
        cfg->max_io_bytes < GLIDE_BLOCK_SIZE || cfg->max_io_bytes > GLIDE_MAX_IO || cfg->max_io_bytes % GLIDE_BLOCK_SIZE) {
        snprintf(err, errlen, "bad ublk queue settings (queues 1-64, depth 1-1024, max io 4 KiB-32 MiB)");
        return -EINVAL;
    }
    struct ublk_device *d = calloc(1, sizeof *d);
    if (!d) return -ENOMEM;
    d->v = v;
    d->cfg = *cfg;
    d->char_fd = -1;
    d->dev_id = cfg->dev_id;
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    struct ctrl c;
    int rc = ctrl_open(&c, err, errlen);
    if (rc) { free_device(d); return rc; }

    int recover = 0, resize = 0;
    if (cfg->dev_id >= 0) {
        struct ublksrv_ctrl_dev_info info;
        memset(&info, 0, sizeof info);
        rc = ctrl_cmd(&c, UBLK_U_CMD_GET_DEV_INFO, (uint32_t)cfg->dev_id, 0, &info, sizeof info);
        if (rc == 0) {
            struct ublk_params p;
            memset(&p, 0, sizeof p);
            p.len = sizeof p;
            rc = ctrl_cmd(&c, UBLK_U_CMD_GET_PARAMS, (uint32_t)cfg->dev_id, 0, &p, sizeof p);
            uint64_t dev_size = p.basic.dev_sectors << 9;
            resize = rc == 0 && dev_size < v->size; /* the volume grew since the device was made */
            if (rc == 0 && dev_size > v->size) {
                snprintf(err, errlen, "ublk device %d was left by an earlier run with size %llu bytes, but the "
                         "volume has %llu; refusing to attach (remove the device if it is stale)",
                         cfg->dev_id, (unsigned long long)(p.basic.dev_sectors << 9), (unsigned long long)v->size);
                rc = -EINVAL;
                goto fail;
            }
            if (info.ublksrv_flags != cfg->owner_tag) {
                snprintf(err, errlen, "ublk device %d (with size %llu bytes) already exists and was not created by "
                         "glidefs for this volume; choose another ublk_id, or remove the device if it is stale",
                         cfg->dev_id, (unsigned long long)dev_size);
                rc = -EEXIST;
                goto fail;
            }
            if (info.state == UBLK_S_DEV_LIVE && info.ublksrv_pid > 0 && info.ublksrv_pid != getpid() &&
                kill(info.ublksrv_pid, 0) == 0) {
                snprintf(err, errlen, "ublk device %d is being served by live process %d", cfg->dev_id,
                         info.ublksrv_pid);
                rc = -EBUSY;
                goto fail;
            }
            if (info.state == UBLK_S_DEV_DEAD) {
                /* added but never started, or stopped: nothing to recover */
                ctrl_cmd(&c, UBLK_U_CMD_DEL_DEV, (uint32_t)cfg->dev_id, 0, NULL, 0);
            } else {
                recover = 1;
            }
            /* A kernel that cannot resize (before 6.16) gets the device back at
             * its old size rather than a refusal: the guest's I/O is waiting on
             * this device, every request it can send lies inside the volume,
             * and the caller reports the smaller size (it reads it from sysfs).
             * A device created afresh (--release-devices) has the full size. */
            if (recover && resize && !can_update_size(&c)) resize = 0;
        } else if (rc != -ENODEV && rc != -ENOENT) {
            snprintf(err, errlen, "GET_DEV_INFO for ublk device %d: %s", cfg->dev_id, strerror(-rc));
            goto fail;
        }
    }

    if (recover) {
        /* EBUSY until the device is QUIESCED and the last holder of
         * /dev/ublkcN (fd, mmap, pending ring command) has let go, which the
         * kernel finishes asynchronously after the previous daemon exits. */
        for (int tries = 0;; tries++) {
            rc = ctrl_cmd(&c, UBLK_U_CMD_START_USER_RECOVERY, (uint32_t)d->dev_id, 0, NULL, 0);
            if (rc != -EBUSY || tries >= 10000) break;
            usleep(1000);
        }
        if (rc == -EBUSY) {
            snprintf(err, errlen, "START_USER_RECOVERY on ublk device %d: still busy after 10 s; another process "
                     "may still hold /dev/ublkc%d", d->dev_id, d->dev_id);
            goto fail;
        }
        if (rc < 0) {
            snprintf(err, errlen, "START_USER_RECOVERY on ublk device %d: %s", d->dev_id, strerror(-rc));
            goto fail;
        }
    } else {
        struct ublksrv_ctrl_dev_info info;
        memset(&info, 0, sizeof info);
        info.nr_hw_queues = (uint16_t)cfg->nr_queues;
        info.queue_depth = (uint16_t)cfg->depth;
        info.max_io_buf_bytes = cfg->max_io_bytes;
        info.dev_id = cfg->dev_id < 0 ? UINT32_MAX : (uint32_t)cfg->dev_id;
        info.flags = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_CMD_IOCTL_ENCODE;
        info.ublksrv_flags = cfg->owner_tag;
        rc = ctrl_cmd(&c, UBLK_U_CMD_ADD_DEV, info.dev_id, 0, &info, sizeof info);
        if (rc < 0) {
            snprintf(err, errlen, "ADD_DEV (ublk id %d): %s", cfg->dev_id, strerror(-rc));
            goto fail;
        }
        d->dev_id = (int)info.dev_id;
        struct ublk_params p;
        fill_params(d, &p);
        rc = ctrl_cmd(&c, UBLK_U_CMD_SET_PARAMS, (uint32_t)d->dev_id, 0, &p, sizeof p);
        if (rc < 0) {
            snprintf(err, errlen, "SET_PARAMS on ublk device %d: %s", d->dev_id, strerror(-rc));
            ctrl_cmd(&c, UBLK_U_CMD_DEL_DEV, (uint32_t)d->dev_id, 0, NULL, 0);
            goto fail;
        }
    }
    rc = open_char_dev(d, err, errlen);
    if (rc) goto fail_created;
    rc = start_queues(d, err, errlen);
    if (rc) goto fail_created;
    /* START_DEV / END_USER_RECOVERY return once every queue has fetched. */
    rc = ctrl_cmd(&c, recover ? UBLK_U_CMD_END_USER_RECOVERY : UBLK_U_CMD_START_DEV, (uint32_t)d->dev_id,
                  (uint64_t)getpid(), NULL, 0);
    if (rc < 0) {
        snprintf(err, errlen, "%s on ublk device %d: %s", recover ? "END_USER_RECOVERY" : "START_DEV", d->dev_id,
                 strerror(-rc));
        goto fail_created;
    }
    if (resize && recover) {
        rc = update_size(&c, d->dev_id, v->size, err, errlen);
        if (rc == 0) {
            snprintf(err, errlen, "UPDATE_SIZE on ublk device %d: refused by the kernel", d->dev_id);
            rc = -EOPNOTSUPP;
        }
        if (rc < 0) goto fail_created;
    }
    ctrl_close(&c);
    *recovered = recover;
    *out = d;
    return 0;

fail_created:
    stop_queues(d);
    if (!recover) ctrl_cmd(&c, UBLK_U_CMD_DEL_DEV, (uint32_t)d->dev_id, 0, NULL, 0);
fail:
    ctrl_close(&c);
    free_device(d);
    return rc;
}

int ublk_device_id(const struct ublk_device *d) { return d->dev_id; }

void ublk_detach(struct ublk_device *d) {
    stop_queues(d);
    free_device(d); /* closing /dev/ublkcN quiesces the device */
}

int ublk_remove(struct ublk_device *d, char *err, size_t errlen) {
    struct ctrl c;
    int rc = ctrl_open(&c, err, errlen);
    if (rc) { ublk_detach(d); return rc; }
    /* STOP_DEV removes the disk (our queues keep serving while it drains),
     * then aborts every fetch, which ends the queue threads. */
    rc = ctrl_cmd(&c, UBLK_U_CMD_STOP_DEV, (uint32_t)d->dev_id, 0, NULL, 0);
    if (rc < 0) snprintf(err, errlen, "STOP_DEV on ublk device %d: %s", d->dev_id, strerror(-rc));
    stop_queues(d);
    int id = d->dev_id;
    free_device(d);
    int rc2 = ctrl_cmd(&c, UBLK_U_CMD_DEL_DEV, (uint32_t)id, 0, NULL, 0);
    if (rc2 < 0 && !rc) { snprintf(err, errlen, "DEL_DEV on ublk device %d: %s", id, strerror(-rc2)); rc = rc2; }
    ctrl_close(&c);
    return rc;
}
