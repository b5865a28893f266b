/* libFuzzer target: the NBD request parser and validator over a byte stream,
 * the way a connection consumes it (header, then payload for WRITE). Every
 * verdict must be one of the three, and an accepted request must be in range. */
#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "../glide_common.h"
#include "../nbd_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct nbd_session s = {.export_size = 1ULL << 30, .max_payload = GLIDE_MAX_IO};
    if (size) {
        s.structured = data[0] & 1;
        s.meta_id = (data[0] >> 1) & 1;
        s.export_size = ((uint64_t)(data[0] >> 2) + 1) << 20;
    }
    size_t pos = size ? 1 : 0;
    while (pos < size) {
        struct nbd_request r;
        int pr = nbd_parse_request(data + pos, size - pos, &r);
        if (pr != NBD_PARSE_OK) break;
        uint32_t err;
        int v = nbd_validate(&s, &r, &err);
        assert(v == NBD_EXECUTE || v == NBD_REJECT || v == NBD_DISCONNECT);
        if (v == NBD_EXECUTE) {
            assert(err == 0);
            if (r.type == NBD_CMD_READ || r.type == NBD_CMD_WRITE || r.type == NBD_CMD_TRIM ||
                r.type == NBD_CMD_WRITE_ZEROES || r.type == NBD_CMD_BLOCK_STATUS || r.type == NBD_CMD_CACHE)
                assert(r.offset <= s.export_size && r.length <= s.export_size - r.offset);
            if (r.type == NBD_CMD_READ || r.type == NBD_CMD_WRITE) assert(r.length <= s.max_payload);
        } else {
            assert(err != 0);
        }
        if (v == NBD_DISCONNECT) break;
        uint8_t out[64];
        nbd_encode_simple_reply(out, r.handle, err);
        nbd_encode_error_chunk(out, r.handle, err ? err : NBD_EIO);
        uint64_t adv = NBD_REQUEST_SIZE + nbd_request_payload(&r);
        if (adv > size - pos) break;
        pos += (size_t)adv;
    }
    return 0;
}
