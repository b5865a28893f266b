/* state_file.c — the state file codec (see state_file.h). Pure: no I/O, no
 * locks, no volume. */
#include "state_file.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block_index.h"
#include "crc32c.h"
#include "glide_common.h"

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

int state_encode_runs(const uint8_t *st, uint64_t nblocks, struct state_image *img) {
    img->cap = STATE_HDR + 4 + 64;
    img->len = STATE_HDR;
    img->nblocks = nblocks;
    img->buf = malloc(img->cap);
    if (!img->buf) return -ENOMEM;
    uint64_t i = 0;
    while (i < nblocks) {
        uint8_t code = st[i] & BLOCK_PERSISTED_MASK;
        uint64_t j = i + 1;
        while (j < nblocks && (st[j] & BLOCK_PERSISTED_MASK) == code) j++;
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

void state_seal(struct state_image *img, const struct state_header *h) {
    uint8_t *buf = img->buf;
    size_t len = img->len;
    memset(buf, 0, STATE_HDR);
    put_le32(buf, STATE_MAGIC);
    put_le32(buf + 4, STATE_VERSION);
    put_le32(buf + 8, GLIDE_BLOCK_SIZE);
    put_le64(buf + 16, h->nblocks);
    put_le64(buf + 24, h->checkpoint_seq);
    put_le64(buf + 32, h->manifest_version);
    memcpy(buf + 40, h->volume_id, 16);
    put_le64(buf + 56, len - STATE_HDR);
    put_le32(buf + len, crc32c(0, buf, len));
    img->len = len + 4;
}

int state_decode_header(const uint8_t *buf, size_t len, struct state_header *h) {
    if (len < STATE_HDR + 4 || get_le32(buf) != STATE_MAGIC || crc32c(0, buf, len - 4) != get_le32(buf + len - 4))
        return STATE_DECODE_CORRUPT;
    h->version = get_le32(buf + 4);
    if ((h->version != 1 && h->version != STATE_VERSION) || get_le32(buf + 8) != GLIDE_BLOCK_SIZE)
        return STATE_DECODE_UNSUPPORTED;
    h->nblocks = get_le64(buf + 16);
    h->checkpoint_seq = get_le64(buf + 24);
    h->manifest_version = get_le64(buf + 32);
    memcpy(h->volume_id, buf + 40, 16);
    return STATE_DECODE_OK;
}

int state_decode_runs(const uint8_t *buf, size_t len, const struct state_header *h, state_run_fn fn, void *ctx) {
    uint64_t rlen = get_le64(buf + 56);
    if (rlen != len - 4 - STATE_HDR) return STATE_DECODE_BAD_LENGTH;
    size_t pos = STATE_HDR;
    uint64_t lba = 0;
    unsigned shift = h->version == 1 ? 2 : 3;
    while (pos < len - 4) {
        uint64_t x;
        if (get_varint(buf, len - 4, &pos, &x) < 0) break;
        uint64_t count = x >> shift;
        uint8_t code = (uint8_t)(x & ((1u << shift) - 1));
        uint8_t base = code & BLOCK_BASE_MASK;
        if (base > BLOCK_ZERO || count > h->nblocks - lba) return STATE_DECODE_BAD_RUNS;
        fn(ctx, lba, count, base, (code & 4u) != 0);
        lba += count;
    }
    return lba == h->nblocks ? STATE_DECODE_OK : STATE_DECODE_BAD_RUNS;
}

const char *state_decode_error(int rc) {
    switch (rc) {
    case STATE_DECODE_OK: return " is valid";
    case STATE_DECODE_CORRUPT: return " is corrupt (bad magic or checksum)";
    case STATE_DECODE_UNSUPPORTED: return " has an unsupported version or block size";
    case STATE_DECODE_BAD_LENGTH: return ": bad length";
    default: return ": block runs do not cover the volume";
    }
}
