/* libFuzzer target: the state file codec (state_file.c).
 *
 * Each input is decoded twice: as given, and with its runs length and CRC
 * fixed up so that mutations reach the run decoder instead of dying at the
 * checksum. Whatever decodes must re-encode to a file that decodes to the
 * same header and the same per-block states (the encoding of the input may be
 * non-canonical: split runs, zero counts, overlong varints, version 1). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../block_index.h"
#include "../crc32c.h"
#include "../glide_common.h"
#include "../state_file.h"

/* Bigger volumes are decoded without materialising their states. */
#define MAX_STATES (1u << 22)

struct sink {
    uint8_t *st; /* NULL: only count */
    uint64_t covered;
};

static void put_run(void *ctx, uint64_t lba, uint64_t count, uint8_t base, int remote) {
    struct sink *s = ctx;
    assert(lba == s->covered && base <= BLOCK_ZERO);
    if (s->st) memset(s->st + lba, base | (remote ? BLOCK_REMOTE : 0), (size_t)count);
    s->covered += count;
}

static void roundtrip(const uint8_t *data, size_t size) {
    struct state_header h;
    if (state_decode_header(data, size, &h) != STATE_DECODE_OK) return;
    struct sink s = {0};
    if (h.nblocks <= MAX_STATES) {
        s.st = malloc(h.nblocks ? (size_t)h.nblocks : 1);
        assert(s.st);
    }
    if (state_decode_runs(data, size, &h, put_run, &s) == STATE_DECODE_OK && s.st) {
        assert(s.covered == h.nblocks);
        struct state_image img;
        assert(state_encode_runs(s.st, h.nblocks, &img) == 0);
        state_seal(&img, &h);
        struct state_header h2;
        assert(state_decode_header(img.buf, img.len, &h2) == STATE_DECODE_OK);
        assert(h2.version == STATE_VERSION && h2.nblocks == h.nblocks && h2.checkpoint_seq == h.checkpoint_seq &&
               h2.manifest_version == h.manifest_version && !memcmp(h2.volume_id, h.volume_id, 16));
        struct sink s2 = {.st = malloc(h.nblocks ? (size_t)h.nblocks : 1)};
        assert(s2.st);
        assert(state_decode_runs(img.buf, img.len, &h2, put_run, &s2) == STATE_DECODE_OK);
        assert(!memcmp(s.st, s2.st, (size_t)h.nblocks));
        free(s2.st);
        free(img.buf);
    }
    free(s.st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    roundtrip(data, size);
    if (size >= STATE_HDR + 4) {
        uint8_t *fixed = malloc(size);
        assert(fixed);
        memcpy(fixed, data, size);
        put_le64(fixed + 56, size - 4 - STATE_HDR);
        put_le32(fixed + size - 4, crc32c(0, fixed, size - 4));
        roundtrip(fixed, size);
        free(fixed);
    }
    return 0;
}
