/* pack_build.c — one pack from a volume's blocks, byte for byte the format of
 * glide/repo/pack.py (version 1), so that module's strict decoders accept it.
 *
 * Work is split in two:
 *  - in parallel (the caller plus threads-1 pthreads, each with its own zstd
 *    context): chunks of consecutive inputs are read as of the cut straight
 *    into their 4 KiB slots of one buffer, then each block is tested for
 *    zeros, hashed (xxh3-128) and compressed; a frame that saves at least
 *    1/8 of the block replaces it in its slot, otherwise the raw block stays
 *    (RAW); after such a block only every 8th is tried until one compresses
 *    again (early abort, below).
 *    Each slot is touched by one thread only, while it is still in cache.
 *  - serially: dedupe by digest (entry numbers in order of first occurrence,
 *    as PackWriter numbers them), payload offsets, then the layout.
 * Invariants: a zero block never gets an entry; one entry per distinct
 * digest; payloads tile [16, index offset) in entry order; any error leaves
 * no result (the caller never sees a partial pack). Duplicates are compressed
 * and then dropped: deduping first would need a second pass over the data,
 * and duplicates within one pack are the exception.
 */
#define _GNU_SOURCE
#include "pack_build.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "glide_common.h"
#include "volume.h"

#define PACK_VERSION 1u
#define HEADER_SIZE 16u
#define INDEX_HEAD 24u
#define INDEX_ENTRY 32u
#define FOOTER_SIZE 40u
#define FLAG_RAW 1u
/* Inputs per unit of work: small enough to balance two threads on a small
 * pack, large enough that a sequential run is read with one call, and
 * 128 KiB of slots stays in L2 between the read and the compression. */
#define CHUNK 32u
#define FRAME_BOUND ZSTD_COMPRESSBOUND(GLIDE_BLOCK_SIZE)
/* ZFS's rule: a block is stored compressed only if that saves at least 1/8
 * of it; less is not worth a decompression on every read (PackWriter keeps
 * the same rule). */
#define KEEP_COMPRESSED_MAX (GLIDE_BLOCK_SIZE - GLIDE_BLOCK_SIZE / 8)
/* Early abort: a block is tried only if it is a probe (every PROBE_EVERY-th
 * input) or the input before it, in the same chunk, was tried and kept
 * compressed; the others are stored RAW untried. zstd -1 runs at ~300 MB/s
 * a core on data it can barely shrink (random, encrypted, already
 * compressed), which made it the whole cost of a stream's sync; now such
 * data costs one try in PROBE_EVERY, while compressible data, once a probe
 * finds it, is tried block after block. Chunks start on a probe, so the
 * output still does not depend on the number of threads. */
#define PROBE_EVERY 8u
_Static_assert(CHUNK % PROBE_EVERY == 0, "every chunk starts with a probe");

struct pack_build {
    size_t n;
    uint8_t *slots;         /* n * 4096: input i's payload (frame or raw) at i * 4096 */
    uint16_t *len;          /* per input: payload length, 4096 = RAW, 0 = zero block */
    uint8_t (*digest)[16];  /* per input, canonical (big-endian) xxh3-128 */
    int32_t *entry_of;      /* per input: entry number or -1 */
    uint32_t *first;        /* per entry: the input holding its payload */
    uint32_t count;
    uint64_t index_offset;
    size_t size;
};

struct job {
    struct pack_build *pb;
    struct volume *v;
    const uint64_t *lbas;
    uint64_t as_of;
    int level;
    atomic_size_t next;
    atomic_int err;
};

static const uint8_t zero_block[GLIDE_BLOCK_SIZE];

static int do_chunk(struct job *j, ZSTD_CCtx *cctx, uint8_t *frame, size_t start, size_t end) {
    struct pack_build *pb = j->pb;
    for (size_t i = start; i < end;) {
        size_t k = i + 1;
        while (k < end && j->lbas[k] == j->lbas[k - 1] + 1) k++;
        /* one call per run of consecutive blocks: one plan, coalesced preads */
        int rc = volume_read_blocks_as_of(j->v, j->lbas[i], k - i, j->as_of, pb->slots + i * GLIDE_BLOCK_SIZE);
        if (rc) return rc;
        i = k;
    }
    int kept = 0; /* the input before this one was tried and kept compressed */
    for (size_t i = start; i < end; i++) {
        uint8_t *blk = pb->slots + i * GLIDE_BLOCK_SIZE;
        if (!memcmp(blk, zero_block, GLIDE_BLOCK_SIZE)) { pb->len[i] = 0; continue; }
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits(blk, GLIDE_BLOCK_SIZE));
        memcpy(pb->digest[i], c.digest, 16);
        pb->len[i] = GLIDE_BLOCK_SIZE;
        if (!kept && i % PROBE_EVERY) continue;
        kept = 0;
        size_t r = ZSTD_compress2(cctx, frame, FRAME_BOUND, blk, GLIDE_BLOCK_SIZE);
        if (ZSTD_isError(r)) return ZSTD_getErrorCode(r) == ZSTD_error_memory_allocation ? -ENOMEM : -EIO;
        if (r <= KEEP_COMPRESSED_MAX) {
            memcpy(blk, frame, r);
            pb->len[i] = (uint16_t)r;
            kept = 1;
        }
    }
    return 0;
}

static void fail(struct job *j, int rc) {
    int none = 0;
    atomic_compare_exchange_strong(&j->err, &none, rc);
}

static void *worker(void *arg) {
    struct job *j = arg;
    uint8_t frame[FRAME_BOUND];
    /* What PackWriter asks of python-zstandard: the content size in the frame
     * header (decoders check it before allocating), no checksum (the xxh3-128
     * covers the block), no dictionary id. */
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!cctx || ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, j->level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 0)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_dictIDFlag, 0))) {
        fail(j, cctx ? -EINVAL : -ENOMEM);
        ZSTD_freeCCtx(cctx);
        return NULL;
    }
    while (!atomic_load(&j->err)) {
        size_t start = atomic_fetch_add(&j->next, CHUNK);
        if (start >= j->pb->n) break;
        size_t end = start + CHUNK < j->pb->n ? start + CHUNK : j->pb->n;
        int rc = do_chunk(j, cctx, frame, start, end);
        if (rc) fail(j, rc);
    }
    ZSTD_freeCCtx(cctx);
    return NULL;
}

/* Entry numbers by first occurrence; an open-addressed table of entry
 * numbers keyed by digest (any 8 bytes of an xxh3 digest are well mixed). */
static int dedupe(struct pack_build *pb) {
    size_t cap = 16;
    while (cap < 2 * pb->n) cap <<= 1;
    uint32_t *table = malloc(cap * sizeof *table);
    if (!table) return -ENOMEM;
    memset(table, 0xff, cap * sizeof *table);
    uint64_t index_offset = HEADER_SIZE;
    for (size_t i = 0; i < pb->n; i++) {
        if (!pb->len[i]) { pb->entry_of[i] = -1; continue; }
        uint64_t h;
        memcpy(&h, pb->digest[i] + 8, sizeof h);
        size_t pos = (size_t)h & (cap - 1);
        while (table[pos] != UINT32_MAX && memcmp(pb->digest[pb->first[table[pos]]], pb->digest[i], 16))
            pos = (pos + 1) & (cap - 1);
        if (table[pos] == UINT32_MAX) {
            table[pos] = pb->count;
            pb->first[pb->count++] = (uint32_t)i;
            index_offset += pb->len[i];
        }
        pb->entry_of[i] = (int32_t)table[pos];
    }
    free(table);
    pb->index_offset = index_offset;
    pb->size = pb->count ? index_offset + INDEX_ENTRY * (pb->count + 1ull) + FOOTER_SIZE : 0;
    return 0;
}

int pack_build_level_ok(int level) { return level >= ZSTD_minCLevel() && level <= ZSTD_maxCLevel(); }

void pack_build_free(struct pack_build *pb) {
    if (!pb) return;
    free(pb->slots);
    free(pb->len);
    free(pb->digest);
    free(pb->entry_of);
    free(pb->first);
    free(pb);
}

int pack_build_run(struct volume *v, const uint64_t *lbas, size_t n, uint64_t as_of, int level, int threads,
                   struct pack_build **out) {
    *out = NULL;
    if (n > PACK_MAX_ENTRIES) return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (lbas[i] >= v->nblocks) return -EINVAL;
    struct pack_build *pb = calloc(1, sizeof *pb);
    if (!pb) return -ENOMEM;
    pb->n = n;
    size_t m = n ? n : 1;
    pb->slots = malloc(m * GLIDE_BLOCK_SIZE);
    pb->len = malloc(m * sizeof *pb->len);
    pb->digest = malloc(m * sizeof *pb->digest);
    pb->entry_of = malloc(m * sizeof *pb->entry_of);
    pb->first = malloc(m * sizeof *pb->first);
    if (!pb->slots || !pb->len || !pb->digest || !pb->entry_of || !pb->first) {
        pack_build_free(pb);
        return -ENOMEM;
    }

    struct job j = {.pb = pb, .v = v, .lbas = lbas, .as_of = as_of, .level = level};
    atomic_init(&j.next, 0);
    atomic_init(&j.err, 0);
    if (threads < 1) threads = 1;
    if (threads > PACK_MAX_THREADS) threads = PACK_MAX_THREADS;
    size_t chunks = (n + CHUNK - 1) / CHUNK;
    if ((size_t)threads > chunks) threads = chunks ? (int)chunks : 1;
    pthread_t tids[PACK_MAX_THREADS];
    int started = 0;
    /* A thread that cannot be started only costs parallelism: the others,
     * and this one, take its share. */
    while (started < threads - 1 && !pthread_create(&tids[started], NULL, worker, &j)) started++;
    worker(&j);
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);

    int rc = atomic_load(&j.err);
    if (!rc) rc = dedupe(pb);
    if (rc) { pack_build_free(pb); return rc; }
    *out = pb;
    return 0;
}

size_t pack_build_size(const struct pack_build *pb) { return pb->size; }

const int32_t *pack_build_entries(const struct pack_build *pb) { return pb->entry_of; }

void pack_build_emit(const struct pack_build *pb, uint8_t *out) {
    if (!pb->count) return;
    uint32_t count = pb->count;
    memcpy(out, "GPAK", 4);
    put_le16(out + 4, PACK_VERSION);
    put_le16(out + 6, 0);
    put_le32(out + 8, count);
    put_le32(out + 12, 0);

    uint8_t *index = out + pb->index_offset;
    size_t index_len = INDEX_ENTRY * (count + 1ull);
    memcpy(index, "GPIX", 4);
    put_le16(index + 4, PACK_VERSION);
    put_le16(index + 6, 0);
    put_le32(index + 8, count);
    put_le32(index + 12, 0);
    put_le64(index + 16, pb->index_offset);
    uint64_t off = HEADER_SIZE;
    for (uint32_t e = 0; e < count; e++) {
        uint32_t i = pb->first[e];
        uint16_t len = pb->len[i];
        memcpy(out + off, pb->slots + (size_t)i * GLIDE_BLOCK_SIZE, len);
        uint8_t *ent = index + INDEX_HEAD + (size_t)e * INDEX_ENTRY;
        memcpy(ent, pb->digest[i], 16);
        put_le64(ent + 16, off);
        put_le32(ent + 24, len);
        put_le16(ent + 28, len == GLIDE_BLOCK_SIZE ? FLAG_RAW : 0);
        put_le16(ent + 30, 0);
        off += len;
    }
    put_le64(index + index_len - 8, XXH3_64bits(index, index_len - 8));

    uint8_t *footer = index + index_len;
    put_le64(footer, pb->index_offset);
    put_le64(footer + 8, index_len);
    put_le64(footer + 16, XXH3_64bits(index, index_len));
    put_le32(footer + 24, count);
    put_le16(footer + 28, PACK_VERSION);
    put_le16(footer + 30, 0);
    put_le32(footer + 32, (uint32_t)XXH3_64bits(footer, 32));
    memcpy(footer + 36, "GPKF", 4);
}
