/* nbd_conn.h — the NBD transmission phase of one client connection.
 *
 * The handshake (option haggling) happens in Python; once an export is chosen
 * the socket is handed here with the negotiated state and from then on no
 * Python runs for this connection. One thread per connection reads requests in
 * batches, executes them against the volume and batches the replies; FLUSH and
 * FUA replies are produced when the WAL's group commit covers them, so other
 * requests on the same connection keep flowing (replies may be out of order).
 * Only the connection's thread ever writes to its socket.
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
};

/* Takes ownership of fd (closed when the connection ends, also on error).
 * `initial` holds bytes the handshake already read past its end. */
int nbd_conn_start(struct volume *v, int fd, const struct nbd_conn_opts *o, const void *initial, size_t ilen);

/* Stop reading on every connection of v, let in-flight requests finish and
 * their replies go out, then close them all; returns when none is left. */
void nbd_conns_shutdown(struct volume *v, int grace_ms);
int nbd_conn_count(struct volume *v);

#endif
