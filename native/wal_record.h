/* wal_record.h — byte layout of WAL segments and records (encode, decode, verify).
 *
 * Pure functions with no I/O, so the decoder can be fuzzed on its own. Layout,
 * all little-endian:
 *
 *   segment header (64 bytes, at offset 0 of every segment file)
 *     0 magic "GSEG"  4 format version  8 segment id  16 seq of its first record
 *     24 volume id (16 bytes)  40 reserved (20 bytes, zero)  60 crc32c of bytes 0..59
 *
 *   record header (32 bytes), followed by nblocks*4096 data bytes for DATA records
 *     0 magic "GWAL"  4 kind  5 flags  6 reserved (u16, zero)  8 seq  16 first lba
 *     24 nblocks  28 crc32c over header bytes 0..27 and then the data
 *
 * A record is valid only if magic, kind, reserved bytes, length and checksum all
 * agree; replay stops at the first record that is not (invariant 3).
 */
#ifndef GLIDE_WAL_RECORD_H
#define GLIDE_WAL_RECORD_H

#include <stddef.h>
#include <stdint.h>

#define WAL_SEG_MAGIC 0x47455347u /* "GSEG" little-endian */
#define WAL_REC_MAGIC 0x4C415747u /* "GWAL" little-endian */
#define WAL_FORMAT_VERSION 1u
#define WAL_SEG_HDR_SIZE 64u
#define WAL_REC_HDR_SIZE 32u

enum wal_kind {
    WAL_KIND_DATA = 1,       /* nblocks blocks of data follow */
    WAL_KIND_ZERO_HOLE = 2,  /* TRIM, or WRITE_ZEROES that may leave a hole */
    WAL_KIND_ZERO_ALLOC = 3, /* WRITE_ZEROES with NO_HOLE: zeros, allocated */
};

struct wal_record {
    uint8_t kind;
    uint8_t flags;
    uint64_t seq;
    uint64_t lba;
    uint32_t nblocks;
    uint32_t crc;
};

struct wal_segment_header {
    uint32_t version;
    uint64_t seg_id;
    uint64_t start_seq;
    uint8_t volume_id[16];
};

enum wal_decode_result {
    WAL_DECODE_OK = 0,
    WAL_DECODE_SHORT = 1, /* fewer bytes than a header or than the record needs */
    WAL_DECODE_BAD = 2,   /* not a valid record: magic, field or checksum wrong */
};

/* Bytes of data that follow a record header of this kind and length. */
uint64_t wal_record_data_len(const struct wal_record *r);

/* Fill `hdr` (WAL_REC_HDR_SIZE bytes) for a record; the checksum covers `data`. */
void wal_record_encode(uint8_t *hdr, const struct wal_record *r, const void *data);

/* Decode only the header; checks magic and fields, not the checksum. */
int wal_record_decode_header(const uint8_t *buf, size_t len, struct wal_record *out);

/* Decode and verify a whole record held in buf[0..len). On success *total is the
 * record's size in bytes (header + data). */
int wal_record_decode(const uint8_t *buf, size_t len, struct wal_record *out, size_t *total);

/* Verify the checksum of an already decoded header against its data. */
int wal_record_check(const uint8_t *hdr, const struct wal_record *r, const void *data);

void wal_segment_header_encode(uint8_t *buf, const struct wal_segment_header *h);
int wal_segment_header_decode(const uint8_t *buf, size_t len, struct wal_segment_header *out);

#endif
