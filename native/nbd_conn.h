/* nbd_conn.h — the NBD transmission phase of one client connection.
 *
 * The handshake (option haggling) happens in Python; once an export is chosen
 * the socket is handed here with the negotiated state and from then on no
 * Python runs for this connection. One thread per connection reads requests in
 * batches, executes them against the volume and batches the replies; FLUSH and
 * FUA replies are produced when the WAL's group commit covers them, so other
 * requests on the same connection keep flowing (replies may be out of order).
 * Only the connection's thread ever writes to its socket.
 *
 * Detach (for the handoff) stops a connection at a request boundary and gives
 * its socket back un-closed, with the bytes read but not consumed and the
 * bytes produced but not sent; nbd_conn_start with the same state resumes it
 * in this process or another one, and the client sees one unbroken stream.
 */
#ifndef GLIDE_NBD_CONN_H
#define GLIDE_NBD_CONN_H

#include <stddef.h>
#include <stdint.h>

struct volume;

struct nbd_conn_opts {
    int structured;       /* structured replies negotiated */
    uint32_t meta_id;     /* base:allocation context id, 0 = not negotiated */
    uint64_t export_size; /* announced in the handshake; 0 = the volume's size now */
    const void *unsent;   /* resume: reply bytes a detached connection still owed */
    size_t unsent_len;
};

/* A connection stopped by nbd_conns_detach: nothing was shut down. */
struct nbd_detached {
    int fd;
    int structured;
    uint32_t meta_id;
    uint64_t export_size;
    uint8_t *in; /* read, not yet consumed: a partial request at most */
    size_t in_len;
    uint8_t *out; /* whole replies (and the rest of a partly sent one), in order */
    size_t out_len;
};

/* Takes ownership of fd (closed when the connection ends, also on error).
 * `initial` holds bytes the handshake already read past its end (at most
 * 512 KiB); o->unsent goes out before any reply of this connection. */
int nbd_conn_start(struct volume *v, int fd, const struct nbd_conn_opts *o, const void *initial, size_t ilen);

/* Stop reading on every connection of v, let in-flight requests finish and
 * their replies go out, then close them all; returns when none is left. */
void nbd_conns_shutdown(struct volume *v, int grace_ms);
int nbd_conn_count(struct volume *v);

/* Stop every connection of v at a request boundary once its pending FLUSH,
 * FUA and parked READ replies are produced; try to send them for 3/4 of
 * timeout_ms. On success *out (malloc'd, *n entries) owns the sockets.
 * Connections that end meanwhile are simply not there. If one cannot stop in
 * time (a READ parked on a hung store, a client stalled inside a WRITE
 * payload over 512 KiB) nothing is detached: the ones that had stopped are
 * served again here, the others just go on, and -ETIMEDOUT is returned. */
int nbd_conns_detach(struct volume *v, int timeout_ms, struct nbd_detached **out, size_t *n);
void nbd_detached_free(struct nbd_detached *d, size_t n); /* buffers only, never the fds */

#endif
