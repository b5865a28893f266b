/* module.c — glide._native: the Python face of the C core.
 *
 * A small, explicit API: open a volume, read/write/trim/zero/flush, grow,
 * checkpoint, read a block as of a WAL sequence, hand an NBD socket over after
 * the handshake, shut connections down, stats and I/O metrics. Every call that
 * may block releases the GIL. Python is never called back from C. The typed
 * contract is glide/_native.pyi (tests/unit/test_native_stub.py keeps the two
 * in step). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "crc32c.h"
#include "glide_common.h"
#include "nbd_conn.h"
#include "nbd_proto.h"
#include "pack_build.h"
#include "ublk.h"
#include "volume.h"
#include "wal_record.h"

typedef struct {
    PyObject_HEAD
    struct volume *v;
    struct ublk_device *ublk; /* at most one kernel device per volume */
    /* Lent to the volume, freed only with this object: a call returning after
     * a concurrent close still counts safely, and metrics() outlive close. */
    struct io_metrics *io;
} VolumeObject;

static PyObject *raise_errno(int rc, const char *what) {
    errno = rc < 0 ? -rc : rc;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
}

static int check_open(VolumeObject *self) {
    if (!self->v) { PyErr_SetString(PyExc_ValueError, "volume is closed"); return -1; }
    return 0;
}

/* OSError(errno, err), the errno picking the subclass. */
static PyObject *raise_msg(int rc, const char *err) {
    PyObject *a = Py_BuildValue("(is)", rc < 0 ? -rc : rc, err);
    if (a) { PyErr_SetObject(PyExc_OSError, a); Py_DECREF(a); }
    return NULL;
}

/* What would write into a passive volume's shared files waits for activate(). */
static int check_active(VolumeObject *self) {
    if (check_open(self)) return -1;
    if (!atomic_load(&self->v->passive)) return 0;
    raise_msg(EROFS, "volume is passive (a handoff successor's): activate() it first");
    return -1;
}

static int Volume_init(VolumeObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "size", "wal_budget", "segment_size", "passive", NULL};
    const char *path;
    unsigned long long size, budget = 1ULL << 30, segsize = 64ULL << 20;
    int passive = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sK|KKp", kwlist, &path, &size, &budget, &segsize, &passive))
        return -1;
    if (self->v) { PyErr_SetString(PyExc_ValueError, "already open"); return -1; }
    if (segsize < GLIDE_MAX_IO + WAL_REC_HDR_SIZE + WAL_SEG_HDR_SIZE) {
        PyErr_SetString(PyExc_ValueError, "segment_size must hold one maximal record (a little over 32 MiB)");
        return -1;
    }
    if (!self->io && !(self->io = PyMem_RawCalloc(1, sizeof *self->io))) { PyErr_NoMemory(); return -1; }
    struct volume_config cfg = {.dir = path, .size = size, .wal_budget = budget, .seg_size = segsize,
                                .io = self->io, .passive = passive};
    char err[512];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_open(&cfg, &self->v, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc) {
        if (err[0]) {
            PyObject *exc = (rc == -EINVAL) ? PyExc_ValueError : PyExc_OSError;
            PyErr_Format(exc, "%s", err);
        } else {
            raise_errno(rc, path);
        }
        self->v = NULL;
        return -1;
    }
    return 0;
}

static void close_volume(VolumeObject *self) {
    if (!self->v) return;
    struct volume *v = self->v;
    struct ublk_device *u = self->ublk;
    self->v = NULL;
    self->ublk = NULL;
    Py_BEGIN_ALLOW_THREADS
    if (u) ublk_detach(u); /* the device stays for the next daemon */
    nbd_conns_shutdown(v, 5000);
    volume_close(v);
    Py_END_ALLOW_THREADS
}

static void Volume_dealloc(VolumeObject *self) {
    close_volume(self);
    PyMem_RawFree(self->io);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Volume_close(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    close_volume(self);
    Py_RETURN_NONE;
}

static PyObject *Volume_read(VolumeObject *self, PyObject *args) {
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len) || check_open(self)) return NULL;
    if (len > GLIDE_MAX_IO) { PyErr_SetString(PyExc_ValueError, "read larger than 32 MiB"); return NULL; }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (!out) return NULL;
    int rc;
    char *buf = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    uint64_t t0 = io_begin(self->io, IO_READ);
    rc = volume_read(self->v, off, len, buf);
    io_end(self->io, IO_READ, t0, len, rc != 0);
    Py_END_ALLOW_THREADS
    if (rc) { Py_DECREF(out); return raise_errno(rc, "read"); }
    return out;
}

/* Completes a write-like call started at t0: its FUA wait, its metrics. */
static PyObject *sync_if(VolumeObject *self, int rc, uint64_t seq, int fua, const char *what, int op, uint64_t t0,
                         uint64_t bytes) {
    Py_BEGIN_ALLOW_THREADS
    if (!rc && fua && seq) rc = wal_sync_wait(&self->v->wal, seq);
    io_end(self->io, op, t0, bytes, rc != 0);
    Py_END_ALLOW_THREADS
    if (rc) return raise_errno(rc, what);
    return PyLong_FromUnsignedLongLong(seq);
}

static PyObject *Volume_write(VolumeObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"offset", "data", "fua", NULL};
    unsigned long long off;
    Py_buffer data;
    int fua = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Ky*|p", kwlist, &off, &data, &fua)) return NULL;
    if (check_open(self)) { PyBuffer_Release(&data); return NULL; }
    uint64_t seq = 0, t0, len = (uint64_t)data.len;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    t0 = io_begin(self->io, IO_WRITE);
    rc = volume_write(self->v, off, len, data.buf, &seq);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return sync_if(self, rc, seq, fua, "write", IO_WRITE, t0, len);
}

static PyObject *Volume_trim(VolumeObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"offset", "length", "fua", NULL};
    unsigned long long off, len;
    int fua = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KK|p", kwlist, &off, &len, &fua) || check_open(self)) return NULL;
    uint64_t seq = 0, t0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    t0 = io_begin(self->io, IO_TRIM);
    rc = volume_trim(self->v, off, len, &seq);
    Py_END_ALLOW_THREADS
    return sync_if(self, rc, seq, fua, "trim", IO_TRIM, t0, len);
}

static PyObject *Volume_write_zeroes(VolumeObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"offset", "length", "no_hole", "fua", NULL};
    unsigned long long off, len;
    int no_hole = 0, fua = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KK|pp", kwlist, &off, &len, &no_hole, &fua) || check_open(self))
        return NULL;
    uint64_t seq = 0, t0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    t0 = io_begin(self->io, IO_WRITE_ZEROES);
    rc = volume_write_zeroes(self->v, off, len, no_hole, &seq);
    Py_END_ALLOW_THREADS
    return sync_if(self, rc, seq, fua, "write_zeroes", IO_WRITE_ZEROES, t0, len);
}

static PyObject *Volume_flush(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    uint64_t t0 = io_begin(self->io, IO_FLUSH);
    rc = volume_flush(self->v);
    io_end(self->io, IO_FLUSH, t0, 0, rc != 0);
    Py_END_ALLOW_THREADS
    if (rc) return raise_errno(rc, "flush");
    Py_RETURN_NONE;
}

/* A bypass of 2^32 blocks or more is no cutoff at all: copy everything. */
static int parse_ckpt_args(PyObject *args, PyObject *kw, unsigned long long *upto, uint32_t *bypass) {
    static char *kwlist[] = {"upto", "bypass", NULL};
    unsigned long long b = 0;
    *upto = UINT64_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|KK", kwlist, upto, &b)) return -1;
    *bypass = b > UINT32_MAX ? 0 : (uint32_t)b;
    return 0;
}

static PyObject *Volume_checkpoint(VolumeObject *self, PyObject *args, PyObject *kw) {
    unsigned long long upto;
    uint32_t bypass;
    if (parse_ckpt_args(args, kw, &upto, &bypass) || check_open(self)) return NULL;
    struct checkpoint_stats st;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_checkpoint(self->v, upto, bypass, &st);
    Py_END_ALLOW_THREADS
    if (rc == -ECANCELED) return PyErr_Format(PyExc_InterruptedError, "checkpoint: write-back cancelled");
    if (rc) return raise_errno(rc, "checkpoint");
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "cut_seq", (unsigned long long)st.cut_seq, "blocks_written",
                         (unsigned long long)st.blocks_written, "blocks_zeroed", (unsigned long long)st.blocks_zeroed,
                         "blocks_bypassed", (unsigned long long)st.blocks_bypassed,
                         "state_bytes", (unsigned long long)st.state_bytes);
}

static PyObject *Volume_write_back(VolumeObject *self, PyObject *args, PyObject *kw) {
    unsigned long long upto;
    uint32_t bypass;
    if (parse_ckpt_args(args, kw, &upto, &bypass) || check_open(self)) return NULL;
    struct checkpoint_stats st;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_write_back(self->v, upto, bypass, &st);
    Py_END_ALLOW_THREADS
    if (rc == -ECANCELED) return PyErr_Format(PyExc_InterruptedError, "write_back cancelled (cancel_write_back)");
    if (rc) return raise_errno(rc, "write_back");
    return Py_BuildValue("{s:K,s:K,s:K,s:K}", "cut_seq", (unsigned long long)st.cut_seq, "blocks_written",
                         (unsigned long long)st.blocks_written, "blocks_zeroed", (unsigned long long)st.blocks_zeroed,
                         "blocks_bypassed", (unsigned long long)st.blocks_bypassed);
}

static PyObject *Volume_read_block_as_of(VolumeObject *self, PyObject *args) {
    unsigned long long lba, seq;
    if (!PyArg_ParseTuple(args, "KK", &lba, &seq) || check_open(self)) return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, GLIDE_BLOCK_SIZE);
    if (!out) return NULL;
    char *buf = PyBytes_AS_STRING(out);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_read_block_as_of(self->v, lba, seq, buf);
    Py_END_ALLOW_THREADS
    if (rc) { Py_DECREF(out); return raise_errno(rc, "read_block_as_of"); }
    return out;
}

struct bs_list { PyObject *list; };
static int bs_collect(void *ctx, uint64_t len, uint32_t flags) {
    struct bs_list *b = ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *t = Py_BuildValue("(KI)", (unsigned long long)len, flags);
    int rc = (!t || PyList_Append(b->list, t) < 0) ? -ENOMEM : 0;
    Py_XDECREF(t);
    PyGILState_Release(g);
    return rc;
}

static PyObject *Volume_block_status(VolumeObject *self, PyObject *args) {
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len) || check_open(self)) return NULL;
    struct bs_list b = {PyList_New(0)};
    if (!b.list) return NULL;
    int rc = volume_block_status(self->v, off, len, bs_collect, &b);
    if (rc) { Py_DECREF(b.list); if (!PyErr_Occurred()) raise_errno(rc, "block_status"); return NULL; }
    return b.list;
}

static PyObject *Volume_last_seq(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    return PyLong_FromUnsignedLongLong(wal_last_seq(&self->v->wal));
}

static PyObject *Volume_serve_nbd(VolumeObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "structured", "meta_id", "initial", "export_size", "pending_out", NULL};
    int fd, structured = 0;
    unsigned int meta_id = 0;
    unsigned long long export_size = 0;
    Py_buffer initial = {0}, pending = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|pIy*Ky*", kwlist, &fd, &structured, &meta_id, &initial,
                                     &export_size, &pending))
        return NULL;
    if (check_active(self) || export_size > self->v->size) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "export_size is larger than the volume");
        if (initial.obj) PyBuffer_Release(&initial);
        if (pending.obj) PyBuffer_Release(&pending);
        return NULL;
    }
    /* The size the handshake announced bounds this connection for its life,
     * also after the volume grows; 0 means the size right now. pending_out:
     * replies a detached connection still owed its client (detach_nbd). */
    struct nbd_conn_opts o = {.structured = structured, .meta_id = meta_id, .export_size = export_size,
                              .unsent = pending.obj ? pending.buf : NULL,
                              .unsent_len = pending.obj ? (size_t)pending.len : 0};
    int rc = nbd_conn_start(self->v, fd, &o, initial.obj ? initial.buf : NULL, initial.obj ? (size_t)initial.len : 0);
    if (initial.obj) PyBuffer_Release(&initial);
    if (pending.obj) PyBuffer_Release(&pending);
    if (rc) return raise_errno(rc, "serve_nbd");
    Py_RETURN_NONE;
}

static PyObject *Volume_detach_nbd(VolumeObject *self, PyObject *args) {
    int timeout_ms;
    if (!PyArg_ParseTuple(args, "i", &timeout_ms) || check_open(self)) return NULL;
    struct nbd_detached *d;
    size_t n;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = nbd_conns_detach(self->v, timeout_ms, &d, &n);
    Py_END_ALLOW_THREADS
    if (rc == -ETIMEDOUT)
        return PyErr_Format(PyExc_TimeoutError, "NBD connections did not stop within %d ms; all are served on",
                            timeout_ms);
    if (rc) return raise_errno(rc, "detach_nbd");
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *t = Py_BuildValue("(iNIKy#y#)", d[i].fd, PyBool_FromLong(d[i].structured), d[i].meta_id,
                                    (unsigned long long)d[i].export_size, d[i].in ? (const char *)d[i].in : "",
                                    (Py_ssize_t)d[i].in_len, d[i].out ? (const char *)d[i].out : "",
                                    (Py_ssize_t)d[i].out_len); /* y# makes NULL None */
        if (!t) { Py_CLEAR(list); break; }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    if (!list) /* the sockets must not leak: closing is all that is left */
        for (size_t i = 0; i < n; i++) close(d[i].fd);
    nbd_detached_free(d, n);
    return list;
}

static PyObject *Volume_grow(VolumeObject *self, PyObject *args) {
    unsigned long long size;
    if (!PyArg_ParseTuple(args, "K", &size) || check_open(self)) return NULL;
    if (size % GLIDE_BLOCK_SIZE)
        return PyErr_Format(PyExc_ValueError, "new size %llu is not a multiple of %u", size, GLIDE_BLOCK_SIZE);
    if (size < self->v->size)
        return PyErr_Format(PyExc_ValueError, "new size %llu is smaller than the volume (%llu bytes): "
                            "shrinking is not supported", size, (unsigned long long)self->v->size);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_grow(self->v, size);
    Py_END_ALLOW_THREADS
    if (rc == -EINVAL) return PyErr_Format(PyExc_ValueError, "new size %llu is smaller than the volume", size);
    if (rc) return raise_errno(rc, "grow");
    Py_RETURN_NONE;
}

static PyObject *Volume_shutdown_connections(VolumeObject *self, PyObject *args) {
    int grace_ms = 5000;
    if (!PyArg_ParseTuple(args, "|i", &grace_ms) || check_open(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    nbd_conns_shutdown(self->v, grace_ms);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Volume_attach_ublk(VolumeObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dev_id", "queues", "depth", "max_io", NULL};
    int dev_id = -1, queues = 1, depth = 64;
    unsigned int max_io = 512 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iiiI", kwlist, &dev_id, &queues, &depth, &max_io) ||
        check_active(self))
        return NULL;
    if (self->ublk) { PyErr_SetString(PyExc_ValueError, "volume already has a ublk device"); return NULL; }
    /* The owner tag ties a device to this volume's identity (nonzero). */
    struct ublk_config cfg = {.dev_id = dev_id, .nr_queues = queues, .depth = depth, .max_io_bytes = max_io,
                              .owner_tag = get_le64(self->v->volume_id) | 1};
    char err[512];
    int recovered = 0, rc;
    struct ublk_device *d = NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = ublk_attach(self->v, &cfg, &d, &recovered, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc) {
        errno = -rc;
        PyErr_Format(PyExc_OSError, "%s", err[0] ? err : strerror(-rc));
        return NULL;
    }
    self->ublk = d;
    return Py_BuildValue("(iO)", ublk_device_id(d), recovered ? Py_True : Py_False);
}

static PyObject *Volume_ublk_update_size(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    if (!self->ublk) { PyErr_SetString(PyExc_ValueError, "volume has no ublk device"); return NULL; }
    char err[512];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ublk_update_size(self->ublk, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        PyErr_Format(PyExc_OSError, "%s", err[0] ? err : strerror(-rc));
        return NULL;
    }
    return PyBool_FromLong(rc);
}

static PyObject *Volume_detach_ublk(VolumeObject *self, PyObject *args) {
    int remove = 0;
    if (!PyArg_ParseTuple(args, "|p", &remove)) return NULL;
    struct ublk_device *d = self->ublk;
    if (!d) Py_RETURN_NONE;
    self->ublk = NULL;
    char err[512] = "";
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    if (remove) rc = ublk_remove(d, err, sizeof err);
    else ublk_detach(d);
    Py_END_ALLOW_THREADS
    if (rc) { PyErr_Format(PyExc_OSError, "%s", err); return NULL; }
    Py_RETURN_NONE;
}

/* ---- the object-store side: fetcher, flusher, eviction ---- */

static PyObject *Volume_set_remote(VolumeObject *self, PyObject *args) {
    unsigned long long lba, n;
    int on = 1;
    if (!PyArg_ParseTuple(args, "KK|p", &lba, &n, &on) || check_open(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    volume_set_remote(self->v, lba, n, on);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Volume_miss_fd(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    return PyLong_FromLong(self->v->miss_efd);
}

static PyObject *Volume_take_misses(VolumeObject *self, PyObject *args) {
    Py_ssize_t max = 256;
    if (!PyArg_ParseTuple(args, "|n", &max) || check_open(self)) return NULL;
    if (max < 1 || max > 65536) { PyErr_SetString(PyExc_ValueError, "max must be 1..65536"); return NULL; }
    uint64_t *buf = PyMem_Malloc((size_t)max * sizeof *buf);
    if (!buf) return PyErr_NoMemory();
    size_t n = volume_take_misses(self->v, buf, (size_t)max);
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out && i < n; i++) PyList_SET_ITEM(out, (Py_ssize_t)i, PyLong_FromUnsignedLongLong(buf[i]));
    PyMem_Free(buf);
    return out;
}

static PyObject *Volume_install(VolumeObject *self, PyObject *args) {
    unsigned long long lba;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Ky*", &lba, &data)) return NULL;
    if (check_active(self) || data.len != GLIDE_BLOCK_SIZE) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "install takes exactly one 4096-byte block");
        PyBuffer_Release(&data);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_install(self->v, lba, data.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (rc) return raise_errno(rc, "install");
    Py_RETURN_NONE;
}

static PyObject *Volume_fail_miss(VolumeObject *self, PyObject *args) {
    unsigned long long lba;
    int err = EIO;
    if (!PyArg_ParseTuple(args, "K|i", &lba, &err) || check_open(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    volume_fail_miss(self->v, lba, err);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Volume_evict(VolumeObject *self, PyObject *args) {
    unsigned long long lba, n;
    if (!PyArg_ParseTuple(args, "KK", &lba, &n) || check_active(self)) return NULL;
    uint64_t evicted = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_evict(self->v, lba, n, &evicted);
    Py_END_ALLOW_THREADS
    if (rc) return raise_errno(rc, "evict");
    return PyLong_FromUnsignedLongLong(evicted);
}

static PyObject *Volume_evict_to(VolumeObject *self, PyObject *args) {
    unsigned long long max_cached;
    if (!PyArg_ParseTuple(args, "K", &max_cached) || check_active(self)) return NULL;
    uint64_t evicted = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_evict_to(self->v, max_cached, &evicted);
    Py_END_ALLOW_THREADS
    if (rc) return raise_errno(rc, "evict_to");
    return PyLong_FromUnsignedLongLong(evicted);
}

static PyObject *Volume_set_read_only(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    volume_set_read_only(self->v);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Volume_set_wal_budget(VolumeObject *self, PyObject *args) {
    unsigned long long budget;
    if (!PyArg_ParseTuple(args, "K", &budget) || check_open(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    volume_set_wal_budget(self->v, budget);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Volume_flush_cut(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    uint64_t cut = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_flush_cut(self->v, &cut);
    Py_END_ALLOW_THREADS
    if (rc) return raise_errno(rc, "flush_cut");
    return PyLong_FromUnsignedLongLong(cut);
}

struct dirty_list {
    uint64_t *lba;
    uint8_t *kind;
    size_t n, cap;
};

static int dirty_collect(void *ctx, uint64_t lba, uint8_t kind) {
    struct dirty_list *d = ctx;
    if (d->n == d->cap) {
        size_t nc = d->cap ? d->cap * 2 : 1024;
        uint64_t *nl = realloc(d->lba, nc * sizeof *nl);
        if (!nl) return -ENOMEM;
        d->lba = nl;
        uint8_t *nk = realloc(d->kind, nc);
        if (!nk) return -ENOMEM;
        d->kind = nk;
        d->cap = nc;
    }
    d->lba[d->n] = lba;
    d->kind[d->n++] = kind;
    return 0;
}

static PyObject *Volume_dirty_upto(VolumeObject *self, PyObject *args) {
    unsigned long long cut;
    if (!PyArg_ParseTuple(args, "K", &cut) || check_open(self)) return NULL;
    struct dirty_list d = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_dirty_upto(self->v, cut, dirty_collect, &d);
    Py_END_ALLOW_THREADS
    PyObject *out = rc ? NULL : PyList_New((Py_ssize_t)d.n);
    for (size_t i = 0; out && i < d.n; i++)
        PyList_SET_ITEM(out, (Py_ssize_t)i, Py_BuildValue("(KI)", (unsigned long long)d.lba[i], (unsigned)d.kind[i]));
    free(d.lba);
    free(d.kind);
    if (rc) return raise_errno(rc, "dirty_upto");
    return out;
}

static PyObject *Volume_local_only_blocks(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    struct dirty_list d = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_local_only(self->v, dirty_collect, &d);
    Py_END_ALLOW_THREADS
    PyObject *out = rc ? NULL : PyList_New((Py_ssize_t)d.n);
    for (size_t i = 0; out && i < d.n; i++)
        PyList_SET_ITEM(out, (Py_ssize_t)i, PyLong_FromUnsignedLongLong(d.lba[i]));
    free(d.lba);
    free(d.kind);
    if (rc) return raise_errno(rc, "local_only_blocks");
    return out;
}

static PyObject *Volume_stats(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    struct volume *v = self->v;
    uint64_t dirty, versions, cached;
    pthread_mutex_lock(&v->idx_mu);
    dirty = block_index_dirty_count(v->bi);
    versions = block_index_version_count(v->bi);
    cached = block_index_cached_count(v->bi);
    pthread_mutex_unlock(&v->idx_mu);
    pthread_mutex_lock(&v->wal.mu);
    uint64_t wal_bytes = v->wal.live_bytes, last = v->wal.next_seq - 1, charge = volume_charge(v);
    pthread_mutex_unlock(&v->wal.mu);
    pthread_mutex_lock(&v->wal.sync_mu);
    uint64_t synced = v->wal.synced_seq;
    pthread_mutex_unlock(&v->wal.sync_mu);
#define U(x) (unsigned long long)(x)
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:i,s:i,"
        "s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
        "size", U(v->size), "dirty_blocks", U(dirty), "versions", U(versions), "wal_bytes", U(wal_bytes),
        "charge", U(charge), "budget", U(v->wal_budget), "last_seq", U(last), "synced_seq", U(synced),
        "checkpoint_seq", U(v->checkpoint_seq), "reads", U(v->st.reads), "writes", U(v->st.writes),
        "flushes", U(v->st.flushes), "trims", U(v->st.trims), "zeroes", U(v->st.zeroes),
        "read_bytes", U(v->st.read_bytes), "write_bytes", U(v->st.write_bytes), "wal_syncs", U(v->wal.syncs),
        "backpressure_waits", U(v->st.backpressure_waits), "checkpoints", U(v->st.checkpoints),
        "connections", nbd_conn_count(v), "failed", atomic_load(&v->failed),
        "replayed_records", U(v->replay.applied), "replay_discarded_bytes", U(v->replay.discarded_bytes),
        "replay_segments", U(v->replay.segments), "errors", U(v->st.errors), "misses", U(v->misses),
        "installs", U(v->installs), "fetch_failures", U(v->fetch_failures), "evictions", U(v->evictions),
        "cached_blocks", U(cached));
#undef U
}

static const char *const io_op_names[IO_NOPS] = {"read", "write", "flush", "trim", "write_zeroes"};

/* Relaxed reads of counters that only grow: each value is one that was true
 * at some instant of the call; requests is the sum of the buckets read. */
static PyObject *metrics_dict(struct io_metrics *m) {
    PyObject *ops = PyDict_New();
    for (int o = 0; ops && o < IO_NOPS; o++) {
        struct io_op_counters *c = &m->op[o];
        PyObject *b = PyTuple_New(IO_LAT_BOUNDS + 1);
        unsigned long long requests = 0;
        for (int i = 0; b && i <= IO_LAT_BOUNDS; i++) {
            unsigned long long n = atomic_load_explicit(&c->buckets[i], memory_order_relaxed);
            requests += n;
            PyObject *x = PyLong_FromUnsignedLongLong(n);
            if (!x) { Py_CLEAR(b); break; }
            PyTuple_SET_ITEM(b, i, x);
        }
        PyObject *d = b ? Py_BuildValue("{s:K,s:K,s:K,s:N,s:K}", "requests", requests, "bytes",
                                        (unsigned long long)atomic_load_explicit(&c->bytes, memory_order_relaxed),
                                        "errors",
                                        (unsigned long long)atomic_load_explicit(&c->errors, memory_order_relaxed),
                                        "buckets", b, "sum_ns",
                                        (unsigned long long)atomic_load_explicit(&c->sum_ns, memory_order_relaxed))
                        : NULL;
        if (!d || PyDict_SetItemString(ops, io_op_names[o], d) < 0) Py_CLEAR(ops);
        Py_XDECREF(d);
    }
    if (!ops) return NULL;
    long inflight = atomic_load_explicit(&m->inflight, memory_order_relaxed);
#define R(x) (unsigned long long)atomic_load_explicit(&m->x, memory_order_relaxed)
    return Py_BuildValue("{s:N,s:l,s:K,s:K,s:K}", "ops", ops, "inflight", inflight < 0 ? 0 : inflight,
                         "cache_hits", R(cache_hits), "cache_misses", R(cache_misses), "cache_evicted_bytes",
                         R(evicted_bytes));
#undef R
}

static PyObject *Volume_metrics(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->io) { PyErr_SetString(PyExc_ValueError, "volume was never opened"); return NULL; }
    return metrics_dict(self->io); /* also after close: the final counts */
}

static PyObject *Volume_pressure_fd(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    return PyLong_FromLong(self->v->pressure_efd);
}

static PyObject *Volume_catch_up(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    uint64_t records = 0, bytes = 0;
    char err[512];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_catch_up(self->v, &records, &bytes, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc == -EINVAL) return PyErr_Format(PyExc_ValueError, "catch_up: the volume is not passive");
    if (rc) return err[0] ? raise_msg(rc, err) : raise_errno(rc, "catch_up");
    return Py_BuildValue("(KK)", (unsigned long long)records, (unsigned long long)bytes);
}

static PyObject *Volume_activate(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    char err[512];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = volume_activate(self->v, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc == -EINVAL) return PyErr_Format(PyExc_ValueError, "activate: %s", err);
    if (rc) return err[0] ? raise_msg(rc, err) : raise_errno(rc, "activate");
    Py_RETURN_NONE;
}

static PyObject *Volume_cancel_write_back(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    volume_cancel_write_back(self->v, 1);
    Py_RETURN_NONE;
}

static PyObject *Volume_allow_write_back(VolumeObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self)) return NULL;
    volume_cancel_write_back(self->v, 0);
    Py_RETURN_NONE;
}

static PyObject *Volume_get_passive(VolumeObject *self, void *Py_UNUSED(c)) {
    if (check_open(self)) return NULL;
    return PyBool_FromLong(atomic_load(&self->v->passive));
}

static PyObject *Volume_get_size(VolumeObject *self, void *Py_UNUSED(c)) {
    if (check_open(self)) return NULL;
    return PyLong_FromUnsignedLongLong(self->v->size);
}

static PyMethodDef Volume_methods[] = {
    {"close", (PyCFunction)Volume_close, METH_NOARGS, "Shut connections down and close the volume."},
    {"read", (PyCFunction)Volume_read, METH_VARARGS, "read(offset, length) -> bytes"},
    {"write", (PyCFunction)(void (*)(void))Volume_write, METH_VARARGS | METH_KEYWORDS,
     "write(offset, data, fua=False) -> WAL seq"},
    {"trim", (PyCFunction)(void (*)(void))Volume_trim, METH_VARARGS | METH_KEYWORDS, "trim(offset, length, fua=False)"},
    {"write_zeroes", (PyCFunction)(void (*)(void))Volume_write_zeroes, METH_VARARGS | METH_KEYWORDS,
     "write_zeroes(offset, length, no_hole=False, fua=False)"},
    {"flush", (PyCFunction)Volume_flush, METH_NOARGS, "Make every acknowledged write durable (group commit)."},
    {"checkpoint", (PyCFunction)(void (*)(void))Volume_checkpoint, METH_VARARGS | METH_KEYWORDS,
     "checkpoint(upto=all, bypass=0) -> stats dict; bypass > 0: the cut is committed to the store, "
     "bypassed blocks become ABSENT"},
    {"write_back", (PyCFunction)(void (*)(void))Volume_write_back, METH_VARARGS | METH_KEYWORDS,
     "write_back(upto=all, bypass=0) -> stats dict: a checkpoint's copy into the cache file, no state "
     "change; runs of >= bypass data blocks are not copied"},
    {"read_block_as_of", (PyCFunction)Volume_read_block_as_of, METH_VARARGS, "read_block_as_of(lba, seq) -> bytes"},
    {"block_status", (PyCFunction)Volume_block_status, METH_VARARGS, "block_status(offset, length) -> [(len, flags)]"},
    {"last_seq", (PyCFunction)Volume_last_seq, METH_NOARGS, "Sequence number of the newest WAL record."},
    {"serve_nbd", (PyCFunction)(void (*)(void))Volume_serve_nbd, METH_VARARGS | METH_KEYWORDS,
     "serve_nbd(fd, structured=False, meta_id=0, initial=b'', export_size=0) — takes ownership of fd; "
     "export_size: what the handshake announced (0: the size now); pending_out: bytes sent before any reply"},
    {"detach_nbd", (PyCFunction)Volume_detach_nbd, METH_VARARGS,
     "detach_nbd(timeout_ms) -> [(fd, structured, meta_id, export_size, unconsumed_in, unsent_out)]: every "
     "NBD connection stopped at a request boundary, its socket not closed; TimeoutError: none detached"},
    {"grow", (PyCFunction)Volume_grow, METH_VARARGS,
     "grow(new_size): online, while I/O goes on; durable when it returns. A multiple of 4096, not smaller "
     "(ValueError); equal is a no-op. NBD connections keep the size they negotiated."},
    {"ublk_update_size", (PyCFunction)Volume_ublk_update_size, METH_NOARGS,
     "Give the ublk device the volume's size: True, or False when the kernel cannot (UBLK_U_CMD_UPDATE_SIZE "
     "is Linux 6.16+)"},
    {"shutdown_connections", (PyCFunction)Volume_shutdown_connections, METH_VARARGS,
     "shutdown_connections(grace_ms=5000)"},
    {"stats", (PyCFunction)Volume_stats, METH_NOARGS, "Counters and state as a dict."},
    {"metrics", (PyCFunction)Volume_metrics, METH_NOARGS,
     "I/O metrics kept in C: {'ops': {op: {requests, bytes, errors, buckets (13 non-cumulative counts: "
     "LATENCY_BUCKETS then +Inf), sum_ns}}, 'inflight', 'cache_hits', 'cache_misses', "
     "'cache_evicted_bytes'}; ops are read, write, flush, trim, write_zeroes. Monotonic for the life of the "
     "object (after close: the final counts)."},
    {"set_remote", (PyCFunction)Volume_set_remote, METH_VARARGS,
     "set_remote(lba, n, on=True): the store's manifest holds these blocks (or not)"},
    {"miss_fd", (PyCFunction)Volume_miss_fd, METH_NOARGS, "eventfd readable while blocks wait for the fetcher"},
    {"take_misses", (PyCFunction)Volume_take_misses, METH_VARARGS, "take_misses(max=256) -> [lba]"},
    {"install", (PyCFunction)Volume_install, METH_VARARGS,
     "install(lba, block): a fetched, verified block; parked reads run again"},
    {"fail_miss", (PyCFunction)Volume_fail_miss, METH_VARARGS, "fail_miss(lba, errno=EIO): parked reads fail"},
    {"evict", (PyCFunction)Volume_evict, METH_VARARGS, "evict(lba, n) -> evicted: CLEAN blocks the store holds"},
    {"evict_to", (PyCFunction)Volume_evict_to, METH_VARARGS,
     "evict_to(max_cached_blocks) -> evicted: CLOCK sweep until at most that many blocks are cached"},
    {"set_read_only", (PyCFunction)Volume_set_read_only, METH_NOARGS,
     "From now on writes, TRIM and WRITE_ZEROES fail with EROFS (fencing)."},
    {"set_wal_budget", (PyCFunction)Volume_set_wal_budget, METH_VARARGS,
     "set_wal_budget(bytes): writers waiting for space re-check at once"},
    {"flush_cut", (PyCFunction)Volume_flush_cut, METH_NOARGS, "Seal the WAL for a flush; returns the cut seq"},
    {"dirty_upto", (PyCFunction)Volume_dirty_upto, METH_VARARGS,
     "dirty_upto(cut) -> [(lba, kind)]: blocks whose newest version <= cut"},
    {"local_only_blocks", (PyCFunction)Volume_local_only_blocks, METH_NOARGS,
     "Blocks held only locally (written before the volume had a store)"},
    {"attach_ublk", (PyCFunction)(void (*)(void))Volume_attach_ublk, METH_VARARGS | METH_KEYWORDS,
     "attach_ublk(dev_id=-1, queues=1, depth=64, max_io=524288) -> (dev_id, recovered)"},
    {"detach_ublk", (PyCFunction)Volume_detach_ublk, METH_VARARGS,
     "detach_ublk(remove=False): stop serving the device; remove=True also deletes it"},
    {"pressure_fd", (PyCFunction)Volume_pressure_fd, METH_NOARGS, "eventfd readable when a checkpoint would help."},
    {"catch_up", (PyCFunction)Volume_catch_up, METH_NOARGS,
     "catch_up() -> (records, bytes): a passive volume replays what its writer appended since"},
    {"activate", (PyCFunction)Volume_activate, METH_NOARGS,
     "activate(): a passive volume, its writer stopped and synced, becomes an ordinary open volume"},
    {"cancel_write_back", (PyCFunction)Volume_cancel_write_back, METH_NOARGS,
     "write_back/checkpoint, running or later, stop promptly with InterruptedError until allow_write_back()"},
    {"allow_write_back", (PyCFunction)Volume_allow_write_back, METH_NOARGS, "undo cancel_write_back()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Volume_getset[] = {
    {"size", (getter)Volume_get_size, NULL, "size in bytes", NULL},
    {"passive", (getter)Volume_get_passive, NULL, "opened passive and not activated yet", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject VolumeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "glide._native.Volume",
    .tp_basicsize = sizeof(VolumeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One volume of the write cache: WAL, block index, cache file.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Volume_init,
    .tp_dealloc = (destructor)Volume_dealloc,
    .tp_methods = Volume_methods,
    .tp_getset = Volume_getset,
};

/* ---- pure codecs, exposed for unit tests and fuzzing ---- */

static PyObject *py_crc32c(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer b;
    unsigned int crc = 0;
    int sw = 0;
    if (!PyArg_ParseTuple(args, "y*|Ip", &b, &crc, &sw)) return NULL;
    uint32_t r = sw ? crc32c_sw(crc, b.buf, (size_t)b.len) : crc32c(crc, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

static PyObject *py_encode_wal_record(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned int kind, nblocks;
    unsigned long long seq, lba;
    Py_buffer data = {0};
    if (!PyArg_ParseTuple(args, "IKKI|y*", &kind, &seq, &lba, &nblocks, &data)) return NULL;
    struct wal_record r = {.kind = (uint8_t)kind, .seq = seq, .lba = lba, .nblocks = nblocks};
    uint64_t dlen = wal_record_data_len(&r);
    if ((uint64_t)(data.obj ? data.len : 0) != dlen) {
        if (data.obj) PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "data length does not match kind and nblocks");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(WAL_REC_HDR_SIZE + dlen));
    if (out) {
        uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
        wal_record_encode(p, &r, data.obj ? data.buf : NULL);
        if (dlen) memcpy(p + WAL_REC_HDR_SIZE, data.buf, (size_t)dlen);
    }
    if (data.obj) PyBuffer_Release(&data);
    return out;
}

static PyObject *py_decode_wal_record(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    struct wal_record r;
    size_t total = 0;
    int rc = wal_record_decode(b.buf, (size_t)b.len, &r, &total);
    PyBuffer_Release(&b);
    if (rc == WAL_DECODE_SHORT) Py_RETURN_NONE;
    if (rc != WAL_DECODE_OK) { PyErr_SetString(PyExc_ValueError, "invalid WAL record"); return NULL; }
    return Py_BuildValue("{s:I,s:K,s:K,s:I,s:n}", "kind", (unsigned)r.kind, "seq", (unsigned long long)r.seq,
                         "lba", (unsigned long long)r.lba, "nblocks", r.nblocks, "size", (Py_ssize_t)total);
}

static PyObject *py_check_nbd_request(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer b;
    unsigned long long size;
    int structured = 0;
    unsigned int meta = 0;
    if (!PyArg_ParseTuple(args, "y*K|pI", &b, &size, &structured, &meta)) return NULL;
    struct nbd_request r;
    int pr = nbd_parse_request(b.buf, (size_t)b.len, &r);
    PyBuffer_Release(&b);
    if (pr == NBD_PARSE_SHORT) Py_RETURN_NONE;
    if (pr == NBD_PARSE_BAD_MAGIC) { PyErr_SetString(PyExc_ValueError, "bad request magic"); return NULL; }
    struct nbd_session s = {.export_size = size, .max_payload = GLIDE_MAX_IO, .structured = structured, .meta_id = meta};
    uint32_t err;
    int verdict = nbd_validate(&s, &r, &err);
    static const char *names[] = {"execute", "reject", "disconnect"};
    return Py_BuildValue("{s:H,s:H,s:K,s:K,s:I,s:s,s:I}", "flags", r.flags, "type", r.type, "handle",
                         (unsigned long long)r.handle, "offset", (unsigned long long)r.offset, "length", r.length,
                         "verdict", names[verdict], "error", err);
}

static PyObject *py_ublk_probe(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    char msg[512];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ublk_probe(msg, sizeof msg);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(Os)", rc == 0 ? Py_True : Py_False, msg);
}

static PyObject *py_unshare_mounts(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    char msg[256];
    if (glide_unshare_mounts(msg, sizeof msg)) { PyErr_Format(PyExc_OSError, "%s", msg); return NULL; }
    Py_RETURN_NONE;
}

/* ---- the flusher's pack builder ---- */

static PyObject *py_build_pack(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"volume", "lbas", "as_of", "level", "threads", NULL};
    PyObject *vol, *seq;
    unsigned long long as_of;
    int level = 1, threads = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OK|ii", kwlist, &VolumeType, &vol, &seq, &as_of, &level,
                                     &threads))
        return NULL;
    VolumeObject *self = (VolumeObject *)vol;
    if (check_open(self)) return NULL;
    if (!pack_build_level_ok(level)) return PyErr_Format(PyExc_ValueError, "zstd level %d out of range", level);
    if (threads < 1 || threads > PACK_MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "threads must be 1..%d", PACK_MAX_THREADS);
    PyObject *fast = PySequence_Fast(seq, "lbas must be a sequence of block numbers");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if ((size_t)n > PACK_MAX_ENTRIES) {
        Py_DECREF(fast);
        return PyErr_Format(PyExc_ValueError, "a pack holds at most %u blocks", PACK_MAX_ENTRIES);
    }
    uint64_t *lbas = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof *lbas);
    if (!lbas) { Py_DECREF(fast); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long x = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (x == (unsigned long long)-1 && PyErr_Occurred()) { Py_DECREF(fast); PyMem_RawFree(lbas); return NULL; }
        if (x >= self->v->nblocks) {
            Py_DECREF(fast);
            PyMem_RawFree(lbas);
            return PyErr_Format(PyExc_ValueError, "lba %llu is past the end of the volume", x);
        }
        lbas[i] = x;
    }
    Py_DECREF(fast);
    struct pack_build *pb;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pack_build_run(self->v, lbas, (size_t)n, as_of, level, threads, &pb);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(lbas);
    if (rc) return raise_errno(rc, "build_pack");
    /* Sized exactly, so the pack is laid out once, straight into the bytes. */
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)pack_build_size(pb));
    PyObject *entries = data ? PyList_New(n) : NULL;
    if (entries) {
        char *out = PyBytes_AS_STRING(data);
        Py_BEGIN_ALLOW_THREADS
        pack_build_emit(pb, (uint8_t *)out);
        Py_END_ALLOW_THREADS
        const int32_t *e = pack_build_entries(pb);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *x = PyLong_FromLong(e[i]);
            if (!x) { Py_CLEAR(entries); break; }
            PyList_SET_ITEM(entries, i, x);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    pack_build_free(pb);
    Py_END_ALLOW_THREADS
    if (!entries) { Py_XDECREF(data); return NULL; }
    return Py_BuildValue("(NN)", data, entries);
}

static PyMethodDef module_methods[] = {
    {"ublk_probe", py_ublk_probe, METH_NOARGS, "ublk_probe() -> (available, reason)"},
    {"unshare_mounts", py_unshare_mounts, METH_NOARGS, "Private mount namespace (call before threads)."},
    {"crc32c", py_crc32c, METH_VARARGS, "crc32c(data, crc=0, software=False)"},
    {"build_pack", (PyCFunction)(void (*)(void))py_build_pack, METH_VARARGS | METH_KEYWORDS,
     "build_pack(volume, lbas, as_of, level=1, threads=2) -> (pack bytes, [entry or -1 per lba]); "
     "b'' when no block needs storing. as_of=2**64-1 reads the current content."},
    {"encode_wal_record", py_encode_wal_record, METH_VARARGS, "encode_wal_record(kind, seq, lba, nblocks, data=b'')"},
    {"decode_wal_record", py_decode_wal_record, METH_VARARGS, "decode_wal_record(buf) -> dict | None"},
    {"check_nbd_request", py_check_nbd_request, METH_VARARGS,
     "check_nbd_request(buf, export_size, structured=False, meta_id=0) -> dict | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "glide._native", "glidefs C core", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&VolumeType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&VolumeType);
    if (PyModule_AddObject(m, "Volume", (PyObject *)&VolumeType) < 0) { Py_DECREF(&VolumeType); Py_DECREF(m); return NULL; }
    PyModule_AddIntConstant(m, "BLOCK_SIZE", GLIDE_BLOCK_SIZE);
    PyModule_AddIntConstant(m, "MAX_IO", GLIDE_MAX_IO);
    PyModule_AddIntConstant(m, "WAL_KIND_DATA", WAL_KIND_DATA);
    PyModule_AddIntConstant(m, "WAL_KIND_ZERO_HOLE", WAL_KIND_ZERO_HOLE);
    PyModule_AddIntConstant(m, "WAL_KIND_ZERO_ALLOC", WAL_KIND_ZERO_ALLOC);
    PyObject *bounds = PyTuple_New(IO_LAT_BOUNDS);
    for (int i = 0; bounds && i < IO_LAT_BOUNDS; i++) {
        PyObject *x = PyFloat_FromDouble((double)io_lat_bounds_ns[i] / 1e9);
        if (!x) { Py_CLEAR(bounds); break; }
        PyTuple_SET_ITEM(bounds, i, x);
    }
    if (!bounds || PyModule_AddObject(m, "LATENCY_BUCKETS", bounds) < 0) {
        Py_XDECREF(bounds);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
