/* nbd_conn.c — per-connection request loop and its detach/resume (see nbd_conn.h).
 *
 * Invariants: only the connection's thread touches its socket and buffers;
 * output is one byte stream (c->back, then c->out) so a reply cut by a full
 * socket is finished by whoever holds the stream next; a detached socket is
 * out of v->conns before its thread lets go of it, so nbd_conns_shutdown
 * never shuts down a socket that now belongs to someone else. */
#define _GNU_SOURCE
#include "nbd_conn.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "glide_common.h"
#include "nbd_proto.h"
#include "volume.h"

#define IN_CAP (512u * 1024)
#define OUT_CAP (512u * 1024)
#define MAX_EXTENTS 8192u

struct nbd_conn;

struct sync_req {
    struct wal_waiter w; /* first: the waiter is cast back to the request */
    struct nbd_conn *c;
    uint64_t handle;
    uint64_t t0, bytes; /* metrics: the request's start, its size */
    int op;             /* enum io_op */
    int err;
    struct sync_req *next;
};

/* A READ waiting for a block from the object store. */
struct parked_read {
    struct miss_waiter w; /* first: the waiter is cast back to the read */
    struct nbd_conn *c;
    struct nbd_request r;
    uint64_t t0; /* metrics: when the READ was parsed */
    int err;
    struct parked_read *next;
};

struct nbd_conn {
    struct volume *v;
    int fd, efd;
    struct nbd_session sess;
    uint8_t *in;
    size_t in_off, in_len;
    uint8_t *out;
    size_t out_len;
    uint8_t *big;
    size_t big_cap;
    pthread_mutex_t mu; /* done list and pending count */
    struct sync_req *done;
    struct parked_read *unparked; /* fetched: run again */
    struct parked_read *spare;    /* reused, so a READ costs no malloc */
    int pending;
    int dead; /* the socket failed: stop sending */
    uint8_t *back; /* output the socket did not take yet: goes out before c->out */
    size_t back_len, back_cap;
    atomic_int detach;            /* stop at the next request boundary */
    _Atomic uint64_t send_dl;     /* detaching: when sending stops waiting (monotonic ms) */
    struct nbd_detach *dt;        /* (conn_mu) the detach this connection reports to */
    struct nbd_conn *next;
};

/* One nbd_conns_detach call; lives on its caller's stack. */
struct nbd_detach {
    int waiting;               /* (conn_mu) flagged, neither detached nor gone */
    struct nbd_detached *list; /* (conn_mu) room for every flagged connection */
    size_t n;
};

enum { KEEP_GOING = 0, STOP_GRACEFUL = 1, STOP_NOW = 2, DETACH = 3 };

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---------- output ---------- */

static int back_append(struct nbd_conn *c, const uint8_t *p, size_t len) {
    if (c->back_len + len > c->back_cap) {
        size_t cap = c->back_cap ? c->back_cap : 64 * 1024;
        while (cap < c->back_len + len) cap *= 2;
        uint8_t *nb = realloc(c->back, cap);
        if (!nb) { c->dead = 1; return -1; }
        c->back = nb;
        c->back_cap = cap;
    }
    memcpy(c->back + c->back_len, p, len);
    c->back_len += len;
    return 0;
}

/* Bytes of p sent, -1 if the socket failed. Waits for a slow reader, except
 * when detaching past send_dl: what is left then travels with the socket. */
static ssize_t send_some(struct nbd_conn *c, const uint8_t *p, size_t len) {
    size_t done = 0;
    while (done < len && !c->dead) {
        ssize_t n = send(c->fd, p + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) { done += (size_t)n; continue; }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) { c->dead = 1; break; }
        if (atomic_load(&c->detach) && now_ms() >= atomic_load(&c->send_dl)) break;
        /* ticks, not one long block: a detach must see a client that stopped reading */
        struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
        poll(&pfd, 1, 20);
    }
    return c->dead ? -1 : (ssize_t)done;
}

static int send_back(struct nbd_conn *c) {
    if (!c->back_len) return 0;
    ssize_t n = send_some(c, c->back, c->back_len);
    if (n < 0) return -1;
    memmove(c->back, c->back + n, c->back_len - (size_t)n);
    c->back_len -= (size_t)n;
    return 0;
}

static int send_all(struct nbd_conn *c, const void *buf, size_t len) {
    if (c->dead || send_back(c) < 0) return -1;
    if (c->back_len) return back_append(c, buf, len); /* keep the stream in order */
    ssize_t n = send_some(c, buf, len);
    if (n < 0) return -1;
    if ((size_t)n < len) return back_append(c, (const uint8_t *)buf + n, len - (size_t)n);
    return 0;
}

/* Also pushes c->back when c->out is empty. */
static int flush_out(struct nbd_conn *c) {
    int rc = send_all(c, c->out, c->out_len);
    c->out_len = 0;
    return rc;
}

static uint8_t *reserve_out(struct nbd_conn *c, size_t n) {
    if (c->out_len + n > OUT_CAP) flush_out(c);
    uint8_t *p = c->out + c->out_len;
    c->out_len += n;
    return p;
}

static void reply_simple(struct nbd_conn *c, uint64_t handle, uint32_t err) {
    nbd_encode_simple_reply(reserve_out(c, NBD_SIMPLE_REPLY_SIZE), handle, err);
}

static void reply_error(struct nbd_conn *c, const struct nbd_request *r, uint32_t err) {
    if (c->sess.structured && (r->type == NBD_CMD_READ || r->type == NBD_CMD_BLOCK_STATUS))
        nbd_encode_error_chunk(reserve_out(c, NBD_CHUNK_HEADER_SIZE + 6), r->handle, err);
    else
        reply_simple(c, r->handle, err);
}

static int ensure_big(struct nbd_conn *c, size_t n) {
    if (c->big_cap >= n) return 0;
    uint8_t *nb = realloc(c->big, n);
    if (!nb) return -1;
    c->big = nb;
    c->big_cap = n;
    return 0;
}

/* ---------- durability completions ---------- */

static void sync_done(struct wal_waiter *w, int err) {
    struct sync_req *s = (struct sync_req *)w;
    struct nbd_conn *c = s->c;
    s->err = err;
    uint64_t one = 1;
    pthread_mutex_lock(&c->mu);
    s->next = c->done;
    c->done = s;
    /* written under mu so teardown, which waits for pending under mu, never
     * closes efd between our unlock and this write */
    ssize_t n = write(c->efd, &one, sizeof one);
    (void)n;
    pthread_mutex_unlock(&c->mu);
}

/* op, bytes, t0: the request's metrics, recorded when the reply is queued. */
static void reply_when_durable(struct nbd_conn *c, uint64_t handle, uint64_t seq, int op, uint64_t bytes,
                               uint64_t t0) {
    struct sync_req *s = calloc(1, sizeof *s);
    if (!s) {
        reply_simple(c, handle, NBD_ENOMEM);
        io_end(c->v->io, op, t0, 0, 1);
        return;
    }
    s->w.target = seq;
    s->w.done = sync_done;
    s->c = c;
    s->handle = handle;
    s->op = op;
    s->bytes = bytes;
    s->t0 = t0;
    pthread_mutex_lock(&c->mu);
    c->pending++;
    pthread_mutex_unlock(&c->mu);
    wal_sync_async(&c->v->wal, &s->w);
}

static void do_read(struct nbd_conn *c, const struct nbd_request *r, uint64_t t0);

static void drain_completions(struct nbd_conn *c) {
    uint64_t cnt;
    ssize_t n = read(c->efd, &cnt, sizeof cnt);
    (void)n;
    pthread_mutex_lock(&c->mu);
    struct sync_req *list = c->done;
    struct parked_read *unparked = c->unparked;
    c->done = NULL;
    c->unparked = NULL;
    pthread_mutex_unlock(&c->mu);
    int k = 0;
    while (list) {
        struct sync_req *nx = list->next;
        reply_simple(c, list->handle, nbd_errno_to_wire(list->err));
        io_end(c->v->io, list->op, list->t0, list->bytes, list->err != 0);
        free(list);
        list = nx;
        k++;
    }
    while (unparked) {
        struct parked_read *nx = unparked->next;
        struct nbd_request r = unparked->r;
        int err = unparked->err;
        uint64_t t0 = unparked->t0;
        unparked->next = c->spare;
        c->spare = unparked;
        /* run it again: it may park once more on another block */
        if (err) {
            reply_error(c, &r, nbd_errno_to_wire(err));
            io_end(c->v->io, IO_READ, t0, 0, 1);
        } else {
            do_read(c, &r, t0);
        }
        unparked = nx;
        k++;
    }
    if (k) {
        pthread_mutex_lock(&c->mu);
        c->pending -= k;
        pthread_mutex_unlock(&c->mu);
    }
}

/* ---------- commands ---------- */

static void read_unparked(struct miss_waiter *w, int err) {
    struct parked_read *p = (struct parked_read *)w;
    struct nbd_conn *c = p->c;
    p->err = err;
    uint64_t one = 1;
    pthread_mutex_lock(&c->mu);
    p->next = c->unparked;
    c->unparked = p;
    ssize_t n = write(c->efd, &one, sizeof one);
    (void)n;
    pthread_mutex_unlock(&c->mu);
}

static struct parked_read *get_parked(struct nbd_conn *c) {
    struct parked_read *p = c->spare;
    if (p) c->spare = p->next;
    else p = malloc(sizeof *p);
    return p;
}

static void read_failed(struct nbd_conn *c, const struct nbd_request *r, uint32_t err, uint64_t t0) {
    reply_error(c, r, err);
    io_end(c->v->io, IO_READ, t0, 0, 1);
}

/* Answers the READ, or parks it (then drain_completions runs it again with
 * the same t0); its metrics are recorded when an answer is queued. */
static void do_read(struct nbd_conn *c, const struct nbd_request *r, uint64_t t0) {
    size_t hdr = c->sess.structured ? NBD_CHUNK_HEADER_SIZE + 8 : NBD_SIMPLE_REPLY_SIZE;
    if (r->length == 0) {
        if (c->sess.structured)
            nbd_encode_chunk_header(reserve_out(c, NBD_CHUNK_HEADER_SIZE), NBD_REPLY_FLAG_DONE,
                                    NBD_REPLY_TYPE_NONE, r->handle, 0);
        else
            reply_simple(c, r->handle, 0);
        io_end(c->v->io, IO_READ, t0, 0, 0);
        return;
    }
    size_t total = hdr + r->length;
    uint8_t *p;
    int direct = total > OUT_CAP;
    if (direct) {
        flush_out(c);
        if (ensure_big(c, total) < 0) { read_failed(c, r, NBD_ENOMEM, t0); return; }
        p = c->big;
    } else {
        p = reserve_out(c, total);
    }
    struct parked_read *pr = get_parked(c);
    if (!pr) {
        if (!direct) c->out_len -= total;
        read_failed(c, r, NBD_ENOMEM, t0);
        return;
    }
    pr->w.done = read_unparked;
    pr->c = c;
    pr->r = *r;
    pr->t0 = t0;
    int rc = volume_read_or_park(c->v, r->offset, r->length, p + hdr, &pr->w);
    if (rc == VOLUME_PARKED) {
        /* the reply goes out when the block arrives; the connection goes on */
        if (!direct) c->out_len -= total;
        pthread_mutex_lock(&c->mu);
        c->pending++;
        pthread_mutex_unlock(&c->mu);
        return;
    }
    pr->next = c->spare;
    c->spare = pr;
    if (rc) {
        if (!direct) c->out_len -= total;
        read_failed(c, r, nbd_errno_to_wire(rc), t0);
        return;
    }
    if (c->sess.structured) {
        nbd_encode_chunk_header(p, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, r->handle, 8 + r->length);
        put_be64(p + NBD_CHUNK_HEADER_SIZE, r->offset);
    } else {
        nbd_encode_simple_reply(p, r->handle, 0);
    }
    if (direct) send_all(c, p, total);
    io_end(c->v->io, IO_READ, t0, r->length, 0);
}

struct bs_ctx {
    uint8_t *desc;
    uint32_t n, max;
    uint64_t left;
};

static int bs_extent(void *ctx, uint64_t len, uint32_t flags) {
    struct bs_ctx *b = ctx;
    if (len > b->left) len = b->left;
    if (b->n && get_be32(b->desc + (b->n - 1) * 8 + 4) == flags &&
        (uint64_t)get_be32(b->desc + (b->n - 1) * 8) + len <= UINT32_MAX) {
        put_be32(b->desc + (b->n - 1) * 8, get_be32(b->desc + (b->n - 1) * 8) + (uint32_t)len);
    } else {
        if (b->n == b->max) return 1;
        put_be32(b->desc + b->n * 8, (uint32_t)len);
        put_be32(b->desc + b->n * 8 + 4, flags);
        b->n++;
    }
    b->left -= len;
    return b->left ? 0 : 1;
}

static void do_block_status(struct nbd_conn *c, const struct nbd_request *r) {
    uint32_t max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_EXTENTS;
    size_t cap = NBD_CHUNK_HEADER_SIZE + 4 + (size_t)max * 8;
    flush_out(c);
    if (ensure_big(c, cap) < 0) { reply_error(c, r, NBD_ENOMEM); return; }
    struct bs_ctx b = {.desc = c->big + NBD_CHUNK_HEADER_SIZE + 4, .max = max, .left = r->length};
    int rc = volume_block_status(c->v, r->offset, r->length, bs_extent, &b);
    if (rc || b.n == 0) { reply_error(c, r, nbd_errno_to_wire(rc ? rc : -EIO)); return; }
    nbd_encode_chunk_header(c->big, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, r->handle, 4 + b.n * 8);
    put_be32(c->big + NBD_CHUNK_HEADER_SIZE, c->sess.meta_id);
    send_all(c, c->big, NBD_CHUNK_HEADER_SIZE + 4 + (size_t)b.n * 8);
}

static void finish_write(struct nbd_conn *c, const struct nbd_request *r, int rc, uint64_t seq, int op,
                         uint64_t t0) {
    if ((r->flags & NBD_CMD_FLAG_FUA) && seq && !rc) {
        reply_when_durable(c, r->handle, seq, op, r->length, t0);
        return;
    }
    reply_simple(c, r->handle, nbd_errno_to_wire(rc));
    io_end(c->v->io, op, t0, r->length, rc != 0);
}

/* Which counters a command feeds (BLOCK_STATUS, CACHE and DISC none). */
static int io_op_of(uint16_t type) {
    switch (type) {
    case NBD_CMD_READ: return IO_READ;
    case NBD_CMD_WRITE: return IO_WRITE;
    case NBD_CMD_FLUSH: return IO_FLUSH;
    case NBD_CMD_TRIM: return IO_TRIM;
    case NBD_CMD_WRITE_ZEROES: return IO_WRITE_ZEROES;
    default: return IO_UNCOUNTED;
    }
}

static int execute(struct nbd_conn *c, const struct nbd_request *r, const uint8_t *payload, uint64_t t0) {
    uint64_t seq = 0;
    int rc;
    switch (r->type) {
    case NBD_CMD_READ:
        do_read(c, r, t0);
        break;
    case NBD_CMD_WRITE:
        rc = volume_write(c->v, r->offset, r->length, payload, &seq);
        finish_write(c, r, rc, seq, IO_WRITE, t0);
        break;
    case NBD_CMD_FLUSH:
        atomic_fetch_add(&c->v->st.flushes, 1);
        reply_when_durable(c, r->handle, wal_last_seq(&c->v->wal), IO_FLUSH, 0, t0);
        break;
    case NBD_CMD_TRIM:
        rc = volume_trim(c->v, r->offset, r->length, &seq);
        finish_write(c, r, rc, seq, IO_TRIM, t0);
        break;
    case NBD_CMD_WRITE_ZEROES:
        /* Zeroing is a metadata record here, always faster than a WRITE, so
         * FAST_ZERO never needs to fail with ENOTSUP. */
        rc = volume_write_zeroes(c->v, r->offset, r->length, (r->flags & NBD_CMD_FLAG_NO_HOLE) != 0, &seq);
        finish_write(c, r, rc, seq, IO_WRITE_ZEROES, t0);
        break;
    case NBD_CMD_CACHE:
        /* Every block is local until the object store arrives: nothing to warm. */
        reply_simple(c, r->handle, 0);
        break;
    case NBD_CMD_BLOCK_STATUS:
        do_block_status(c, r);
        break;
    case NBD_CMD_DISC:
        return STOP_GRACEFUL;
    }
    return KEEP_GOING;
}

static int recv_full(struct nbd_conn *c, uint8_t *buf, size_t len) {
    while (len) {
        ssize_t n = recv(c->fd, buf, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Run every complete request in the input buffer. */
static int process_input(struct nbd_conn *c) {
    for (;;) {
        if (atomic_load(&c->detach)) break; /* a request boundary */
        size_t avail = c->in_len - c->in_off;
        const uint8_t *p = c->in + c->in_off;
        struct nbd_request r;
        int pr = nbd_parse_request(p, avail, &r);
        if (pr == NBD_PARSE_BAD_MAGIC) return STOP_NOW;
        if (pr == NBD_PARSE_SHORT) break;
        uint32_t err;
        int verdict = nbd_validate(&c->sess, &r, &err);
        if (verdict == NBD_DISCONNECT) return STOP_NOW;
        uint64_t payload = nbd_request_payload(&r);
        size_t need = NBD_REQUEST_SIZE + (size_t)payload;
        const uint8_t *data = p + NBD_REQUEST_SIZE;
        if (avail < need && need <= IN_CAP) break; /* wait for the rest in the buffer */
        int op = io_op_of(r.type);
        uint64_t t0 = io_begin(c->v->io, op); /* parsed: the request's latency starts */
        if (avail < need) {
            /* A payload larger than the input buffer is read straight into the
             * big buffer; payload <= max_payload was checked above. */
            flush_out(c);
            if (ensure_big(c, (size_t)payload) < 0) { io_end(c->v->io, op, t0, 0, 1); return STOP_NOW; }
            size_t have = avail - NBD_REQUEST_SIZE;
            memcpy(c->big, data, have);
            if (recv_full(c, c->big + have, (size_t)payload - have) < 0) {
                io_end(c->v->io, op, t0, 0, 1); /* never answered: the connection ends */
                return STOP_NOW;
            }
            data = c->big;
            c->in_off = c->in_len; /* everything buffered was this request */
        } else {
            c->in_off += need;
        }
        int st = KEEP_GOING;
        if (verdict == NBD_REJECT) {
            reply_error(c, &r, err);
            io_end(c->v->io, op, t0, 0, 1);
        } else {
            st = execute(c, &r, data, t0);
        }
        if (st != KEEP_GOING) return st;
        if (c->dead) return STOP_NOW;
    }
    /* keep the partial request at the front of the buffer */
    if (c->in_off) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    return KEEP_GOING;
}

static void conn_free(struct nbd_conn *c) {
    while (c->spare) {
        struct parked_read *nx = c->spare->next;
        free(c->spare);
        c->spare = nx;
    }
    if (c->efd >= 0) close(c->efd);
    free(c->in);
    free(c->out);
    free(c->big);
    free(c->back);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Serve until the connection ends (STOP_*) or a detach stops it (DETACH). */
static int serve(struct nbd_conn *c) {
    int st = process_input(c);
    while (st == KEEP_GOING) {
        drain_completions(c);
        if (flush_out(c) < 0) return STOP_NOW;
        if (atomic_load(&c->detach)) return DETACH;
        struct pollfd pfd[2] = {{.fd = c->fd, .events = POLLIN}, {.fd = c->efd, .events = POLLIN}};
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return STOP_GRACEFUL;
        }
        if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (n <= 0) return STOP_GRACEFUL; /* replies already owed still go out */
            c->in_len += (size_t)n;
            st = process_input(c);
        }
    }
    return st;
}

/* Called at a request boundary with the detach flag seen. Answers what is
 * pending, sends what the socket takes until send_dl, then hands the socket
 * to c->dt. 1: detached and freed; 0: the detach was called off, serve on;
 * -1: the socket failed meanwhile. */
static int detach_conn(struct nbd_conn *c) {
    struct volume *v = c->v;
    for (;;) {
        drain_completions(c);
        if (c->dead) return -1;
        pthread_mutex_lock(&c->mu);
        int pending = c->pending;
        pthread_mutex_unlock(&c->mu);
        if (!pending) break;
        if (!atomic_load(&c->detach)) return 0;
        struct pollfd pfd = {.fd = c->efd, .events = POLLIN}; /* completions and call-offs poke it */
        poll(&pfd, 1, 100);
    }
    if (flush_out(c) < 0) return -1;
    if (c->in_off) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    pthread_mutex_lock(&v->conn_mu);
    struct nbd_detach *dt = c->dt;
    if (!dt) { pthread_mutex_unlock(&v->conn_mu); return 0; }
    dt->list[dt->n++] = (struct nbd_detached){
        .fd = c->fd, .structured = c->sess.structured, .meta_id = c->sess.meta_id,
        .export_size = c->sess.export_size, .in = c->in, .in_len = c->in_len,
        .out = c->back, .out_len = c->back_len};
    c->in = NULL;
    c->back = NULL;
    struct nbd_conn **link = &v->conns;
    while (*link && *link != c) link = &(*link)->next;
    if (*link) *link = c->next;
    v->nconns--;
    dt->waiting--;
    pthread_cond_broadcast(&v->conn_cv);
    pthread_mutex_unlock(&v->conn_mu);
    conn_free(c); /* the socket is not ours any more: not closed */
    return 1;
}

static void *conn_main(void *arg) {
    struct nbd_conn *c = arg;
    struct volume *v = c->v;
    int st;
    for (;;) {
        st = serve(c);
        if (st != DETACH) break;
        int d = detach_conn(c);
        if (d > 0) return NULL;
        if (d < 0) { st = STOP_NOW; break; }
    }
    /* Requests already taken are answered before the socket closes (DISC
     * requires it; for a vanished client the sends just fail). */
    for (;;) {
        drain_completions(c);
        pthread_mutex_lock(&c->mu);
        int pending = c->pending;
        pthread_mutex_unlock(&c->mu);
        if (!pending) break;
        struct pollfd pfd = {.fd = c->efd, .events = POLLIN};
        poll(&pfd, 1, 1000);
    }
    if (st != STOP_NOW) flush_out(c);

    pthread_mutex_lock(&v->conn_mu);
    struct nbd_conn **link = &v->conns;
    while (*link && *link != c) link = &(*link)->next;
    if (*link) *link = c->next;
    close(c->fd); /* under conn_mu: shutdown() never sees a reused fd number */
    v->nconns--;
    if (c->dt) c->dt->waiting--; /* ended on its own: just gone */
    pthread_cond_broadcast(&v->conn_cv);
    pthread_mutex_unlock(&v->conn_mu);
    conn_free(c);
    return NULL;
}

int nbd_conn_start(struct volume *v, int fd, const struct nbd_conn_opts *o, const void *initial, size_t ilen) {
    struct nbd_conn *c = calloc(1, sizeof *c);
    if (!c || ilen > IN_CAP) { free(c); close(fd); return -ENOMEM; }
    c->v = v;
    c->fd = fd;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    /* Every request is checked against the size this client was told, for
     * the life of the connection: a volume that grows meanwhile is seen only
     * by new connections (the NBD protocol has no resize notification). */
    c->sess = (struct nbd_session){.export_size = o->export_size ? o->export_size : v->size,
                                   .max_payload = GLIDE_MAX_IO,
                                   .structured = o->structured, .meta_id = o->meta_id};
    c->in = malloc(IN_CAP);
    c->out = malloc(OUT_CAP);
    pthread_mutex_init(&c->mu, NULL);
    if (c->efd < 0 || !c->in || !c->out || (o->unsent_len && back_append(c, o->unsent, o->unsent_len) < 0)) {
        close(fd);
        conn_free(c);
        return -ENOMEM;
    }
    if (ilen) memcpy(c->in, initial, ilen);
    c->in_len = ilen;

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_mutex_lock(&v->conn_mu);
    c->next = v->conns;
    v->conns = c;
    v->nconns++;
    pthread_t t;
    int rc = pthread_create(&t, &attr, conn_main, c);
    if (rc) {
        v->conns = c->next;
        v->nconns--;
        close(fd);
    }
    pthread_mutex_unlock(&v->conn_mu);
    pthread_attr_destroy(&attr);
    if (rc) { conn_free(c); return -rc; }
    return 0;
}

int nbd_conn_count(struct volume *v) {
    pthread_mutex_lock(&v->conn_mu);
    int n = v->nconns;
    pthread_mutex_unlock(&v->conn_mu);
    return n;
}

static void shutdown_all(struct volume *v, int how) {
    for (struct nbd_conn *c = v->conns; c; c = c->next) shutdown(c->fd, how);
}

/* conn_cv waits use CLOCK_REALTIME (the condition's default clock). */
static struct timespec deadline_in(int ms) {
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += ms / 1000;
    dl.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) { dl.tv_sec++; dl.tv_nsec -= 1000000000L; }
    return dl;
}

void nbd_conns_shutdown(struct volume *v, int grace_ms) {
    pthread_mutex_lock(&v->conn_mu);
    shutdown_all(v, SHUT_RD);
    struct timespec dl = deadline_in(grace_ms);
    while (v->nconns > 0) {
        if (pthread_cond_timedwait(&v->conn_cv, &v->conn_mu, &dl) == ETIMEDOUT) {
            /* a client that stopped reading its replies: cut it off */
            shutdown_all(v, SHUT_RDWR);
            while (v->nconns > 0) pthread_cond_wait(&v->conn_cv, &v->conn_mu);
        }
    }
    pthread_mutex_unlock(&v->conn_mu);
}

static void poke(struct nbd_conn *c) {
    uint64_t one = 1;
    ssize_t n = write(c->efd, &one, sizeof one);
    (void)n;
}

void nbd_detached_free(struct nbd_detached *d, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(d[i].in);
        free(d[i].out);
    }
    free(d);
}

int nbd_conns_detach(struct volume *v, int timeout_ms, struct nbd_detached **out, size_t *n) {
    struct nbd_detach dt = {0};
    *out = NULL;
    *n = 0;
    if (timeout_ms < 0) timeout_ms = 0;
    pthread_mutex_lock(&v->conn_mu);
    dt.list = calloc((size_t)v->nconns + 1, sizeof *dt.list);
    if (!dt.list) { pthread_mutex_unlock(&v->conn_mu); return -ENOMEM; }
    /* sending stops a quarter before the end: a client that does not read
     * costs time but never the detach */
    uint64_t send_dl = now_ms() + (uint64_t)timeout_ms * 3 / 4;
    for (struct nbd_conn *c = v->conns; c; c = c->next) {
        if (c->dt) continue; /* a concurrent detach has it */
        c->dt = &dt;
        atomic_store(&c->send_dl, send_dl);
        atomic_store(&c->detach, 1);
        dt.waiting++;
        poke(c);
    }
    struct timespec dl = deadline_in(timeout_ms);
    while (dt.waiting > 0)
        if (pthread_cond_timedwait(&v->conn_cv, &v->conn_mu, &dl) == ETIMEDOUT) break;
    int late = dt.waiting;
    if (late) {
        /* call the stragglers off: they serve on as if nothing happened */
        for (struct nbd_conn *c = v->conns; c; c = c->next) {
            if (c->dt != &dt) continue;
            c->dt = NULL;
            atomic_store(&c->detach, 0);
            poke(c);
        }
    }
    pthread_mutex_unlock(&v->conn_mu);
    if (late) {
        /* all or nothing: the ones that had stopped are served here again */
        for (size_t i = 0; i < dt.n; i++) {
            struct nbd_detached *d = &dt.list[i];
            struct nbd_conn_opts o = {.structured = d->structured, .meta_id = d->meta_id,
                                      .export_size = d->export_size, .unsent = d->out, .unsent_len = d->out_len};
            nbd_conn_start(v, d->fd, &o, d->in, d->in_len);
        }
        nbd_detached_free(dt.list, dt.n);
        return -ETIMEDOUT;
    }
    *out = dt.list;
    *n = dt.n;
    return 0;
}
