/* nbd_proto.h — NBD transmission-phase wire format: constants, request parsing
 * and validation, reply encoding. Pure functions (no I/O) so they can be
 * fuzzed. Values are the NBD protocol's (doc/proto.md of the NBD project). */
#ifndef GLIDE_NBD_PROTO_H
#define GLIDE_NBD_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu
#define NBD_REQUEST_SIZE 28u
#define NBD_SIMPLE_REPLY_SIZE 16u
#define NBD_CHUNK_HEADER_SIZE 20u

enum nbd_cmd {
    NBD_CMD_READ = 0, NBD_CMD_WRITE = 1, NBD_CMD_DISC = 2, NBD_CMD_FLUSH = 3, NBD_CMD_TRIM = 4,
    NBD_CMD_CACHE = 5, NBD_CMD_WRITE_ZEROES = 6, NBD_CMD_BLOCK_STATUS = 7,
};

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

#define NBD_REPLY_FLAG_DONE (1u << 0)
#define NBD_REPLY_TYPE_NONE 0u
#define NBD_REPLY_TYPE_OFFSET_DATA 1u
#define NBD_REPLY_TYPE_OFFSET_HOLE 2u
#define NBD_REPLY_TYPE_BLOCK_STATUS 5u
#define NBD_REPLY_TYPE_ERROR 0x8001u

#define NBD_EPERM 1u
#define NBD_EIO 5u
#define NBD_ENOMEM 12u
#define NBD_EINVAL 22u
#define NBD_ENOSPC 28u
#define NBD_EOVERFLOW 75u
#define NBD_ENOTSUP 95u
#define NBD_ESHUTDOWN 108u

struct nbd_request {
    uint16_t flags;
    uint16_t type;
    uint64_t handle;
    uint64_t offset;
    uint32_t length;
};

enum nbd_parse_result {
    NBD_PARSE_OK = 0,
    NBD_PARSE_SHORT = 1,     /* need more bytes */
    NBD_PARSE_BAD_MAGIC = 2, /* cannot resynchronise: disconnect */
};

/* What the server does with a parsed request. */
enum nbd_verdict {
    NBD_EXECUTE = 0,    /* valid: run it */
    NBD_REJECT = 1,     /* reply with *err; consume the payload if any */
    NBD_DISCONNECT = 2, /* payload too large to consume safely, or protocol broken */
};

struct nbd_session {
    uint64_t export_size;
    uint32_t max_payload;
    int structured;   /* structured replies negotiated */
    uint32_t meta_id; /* base:allocation context id, 0 = none */
};

int nbd_parse_request(const uint8_t *buf, size_t len, struct nbd_request *out);
/* Payload bytes that follow this request on the wire (WRITE only). */
uint64_t nbd_request_payload(const struct nbd_request *r);
int nbd_validate(const struct nbd_session *s, const struct nbd_request *r, uint32_t *err);
uint32_t nbd_errno_to_wire(int err);

size_t nbd_encode_simple_reply(uint8_t *out, uint64_t handle, uint32_t err);
size_t nbd_encode_chunk_header(uint8_t *out, uint16_t flags, uint16_t type, uint64_t handle, uint32_t len);
/* A final ERROR chunk with no message (18 bytes after the header). */
size_t nbd_encode_error_chunk(uint8_t *out, uint64_t handle, uint32_t err);

#endif
