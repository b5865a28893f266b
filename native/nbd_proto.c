/* nbd_proto.c — request parsing/validation and reply encoding (see nbd_proto.h).
 * Error choices follow the spec: reads, trims, cache and block status past the
 * end are EINVAL, writes and zeroes past the end ENOSPC, unknown commands and
 * flags EINVAL, a WRITE payload over the maximum is a hard disconnect (the
 * spec allows it, and reading gigabytes to stay in sync is the real DoS). */
#include "nbd_proto.h"

#include <errno.h>

#include "glide_common.h"

int nbd_parse_request(const uint8_t *buf, size_t len, struct nbd_request *out) {
    if (len < NBD_REQUEST_SIZE) return NBD_PARSE_SHORT;
    if (get_be32(buf) != NBD_REQUEST_MAGIC) return NBD_PARSE_BAD_MAGIC;
    out->flags = get_be16(buf + 4);
    out->type = get_be16(buf + 6);
    out->handle = get_be64(buf + 8);
    out->offset = get_be64(buf + 16);
    out->length = get_be32(buf + 24);
    return NBD_PARSE_OK;
}

uint64_t nbd_request_payload(const struct nbd_request *r) {
    return r->type == NBD_CMD_WRITE ? r->length : 0;
}

static uint16_t allowed_flags(uint16_t type) {
    switch (type) {
    case NBD_CMD_READ: return NBD_CMD_FLAG_DF;
    case NBD_CMD_WRITE: return NBD_CMD_FLAG_FUA;
    case NBD_CMD_TRIM: return NBD_CMD_FLAG_FUA;
    case NBD_CMD_WRITE_ZEROES: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS: return NBD_CMD_FLAG_REQ_ONE;
    default: return 0;
    }
}

int nbd_validate(const struct nbd_session *s, const struct nbd_request *r, uint32_t *err) {
    *err = 0;
    if (r->type == NBD_CMD_WRITE && r->length > s->max_payload) {
        *err = NBD_EINVAL;
        return NBD_DISCONNECT;
    }
    switch (r->type) {
    case NBD_CMD_READ: case NBD_CMD_WRITE: case NBD_CMD_FLUSH: case NBD_CMD_TRIM:
    case NBD_CMD_CACHE: case NBD_CMD_WRITE_ZEROES: case NBD_CMD_BLOCK_STATUS: case NBD_CMD_DISC:
        break;
    default:
        *err = NBD_EINVAL;
        return NBD_REJECT;
    }
    if (r->flags & ~allowed_flags(r->type)) { *err = NBD_EINVAL; return NBD_REJECT; }
    int beyond = r->offset > s->export_size || r->length > s->export_size - r->offset;
    switch (r->type) {
    case NBD_CMD_READ:
        if (beyond) { *err = NBD_EINVAL; return NBD_REJECT; }
        if (r->length > s->max_payload) {
            *err = (s->structured && (r->flags & NBD_CMD_FLAG_DF)) ? NBD_EOVERFLOW : NBD_EINVAL;
            return NBD_REJECT;
        }
        break;
    case NBD_CMD_WRITE: case NBD_CMD_WRITE_ZEROES:
        if (beyond) { *err = NBD_ENOSPC; return NBD_REJECT; }
        break;
    case NBD_CMD_TRIM: case NBD_CMD_CACHE:
        if (beyond) { *err = NBD_EINVAL; return NBD_REJECT; }
        break;
    case NBD_CMD_BLOCK_STATUS:
        if (!s->structured || !s->meta_id || beyond || r->length == 0) { *err = NBD_EINVAL; return NBD_REJECT; }
        break;
    case NBD_CMD_FLUSH: case NBD_CMD_DISC:
        break;
    }
    return NBD_EXECUTE;
}

uint32_t nbd_errno_to_wire(int err) {
    if (err < 0) err = -err;
    switch (err) {
    case 0: return 0;
    case EPERM: case EROFS: return NBD_EPERM;
    case ENOMEM: return NBD_ENOMEM;
    case EINVAL: case ERANGE: return NBD_EINVAL;
    case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
    case EOVERFLOW: return NBD_EOVERFLOW;
    case ENOTSUP: return NBD_ENOTSUP;
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EIO;
    }
}

size_t nbd_encode_simple_reply(uint8_t *out, uint64_t handle, uint32_t err) {
    put_be32(out, NBD_SIMPLE_REPLY_MAGIC);
    put_be32(out + 4, err);
    put_be64(out + 8, handle);
    return NBD_SIMPLE_REPLY_SIZE;
}

size_t nbd_encode_chunk_header(uint8_t *out, uint16_t flags, uint16_t type, uint64_t handle, uint32_t len) {
    put_be32(out, NBD_STRUCTURED_REPLY_MAGIC);
    put_be16(out + 4, flags);
    put_be16(out + 6, type);
    put_be64(out + 8, handle);
    put_be32(out + 16, len);
    return NBD_CHUNK_HEADER_SIZE;
}

size_t nbd_encode_error_chunk(uint8_t *out, uint64_t handle, uint32_t err) {
    size_t n = nbd_encode_chunk_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, 6);
    put_be32(out + n, err);
    put_be16(out + n + 4, 0);
    return n + 6;
}
