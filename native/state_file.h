/* state_file.h — byte layout of a volume's state file ("GSTA"): pure encode and
 * decode, no I/O and no locks, so the decoder can be fuzzed on its own
 * (native/fuzz/fuzz_state_file.c). Writing it atomically and applying it to a
 * block index is the volume's business (checkpoint.c).
 *
 * Layout, all little-endian:
 *   0 magic "GSTA"  4 version (2)  8 block size  12 reserved (zero)
 *   16 nblocks  24 checkpoint seq  32 manifest version  40 volume id (16 bytes)
 *   56 runs length (bytes)  64 runs  then crc32c of everything before it (u32)
 * Runs are LEB128 varints of (count << 3 | remote << 2 | base state); version
 * 1 files carry no remote bit (count << 2 | base) and are still read. The runs
 * must cover exactly nblocks blocks.
 */
#ifndef GLIDE_STATE_FILE_H
#define GLIDE_STATE_FILE_H

#include <stddef.h>
#include <stdint.h>

#define STATE_MAGIC 0x41545347u /* "GSTA" */
#define STATE_VERSION 2u /* 2: runs carry the REMOTE bit (count << 3); 1 is still read */
#define STATE_HDR 64u

/* A state file being built: the runs are encoded first (from the index, under
 * its lock), the header and CRC filled in later by state_seal (outside it). */
struct state_image {
    uint8_t *buf;
    size_t len, cap;
    uint64_t nblocks; /* what the runs cover: the header must say the same */
};

struct state_header {
    uint32_t version;
    uint64_t nblocks;
    uint64_t checkpoint_seq;
    uint64_t manifest_version;
    uint8_t volume_id[16];
};

/* Runs of the persisted bits of states[0..nblocks), after a STATE_HDR gap,
 * leaving room for the CRC. One pass, memory in proportion to the runs. */
int state_encode_runs(const uint8_t *states, uint64_t nblocks, struct state_image *img);
/* Header (version STATE_VERSION) and CRC: afterwards img->buf[0..img->len)
 * is the whole file. */
void state_seal(struct state_image *img, const struct state_header *h);

enum state_decode_result {
    STATE_DECODE_OK = 0,
    STATE_DECODE_CORRUPT,     /* short, bad magic or bad checksum */
    STATE_DECODE_UNSUPPORTED, /* unknown version or another block size */
    STATE_DECODE_BAD_LENGTH,  /* runs length disagrees with the file size */
    STATE_DECODE_BAD_RUNS,    /* runs are malformed or do not cover nblocks */
};

/* Checks magic, CRC, version and block size and fills *h. */
int state_decode_header(const uint8_t *buf, size_t len, struct state_header *h);
/* Calls fn for each run in order (base is enum block_base, remote 0/1); the
 * runs are validated as they go, so fn may have been called for a prefix
 * when this fails. */
typedef void (*state_run_fn)(void *ctx, uint64_t lba, uint64_t count, uint8_t base, int remote);
int state_decode_runs(const uint8_t *buf, size_t len, const struct state_header *h, state_run_fn fn, void *ctx);
/* What an enum state_decode_result means, to follow "state file PATH". */
const char *state_decode_error(int rc);

#endif
