/* wal_record.c — encode/decode of WAL segment and record headers (see wal_record.h). */
#include "wal_record.h"

#include "crc32c.h"
#include "glide_common.h"

/* A record never carries more than one NBD request's worth of blocks. */
#define WAL_MAX_RECORD_BLOCKS (GLIDE_MAX_IO / GLIDE_BLOCK_SIZE)
/* TRIM/ZERO records carry no data, so they may cover much more. */
#define WAL_MAX_ZERO_BLOCKS (1u << 30)

uint64_t wal_record_data_len(const struct wal_record *r) {
    return r->kind == WAL_KIND_DATA ? (uint64_t)r->nblocks * GLIDE_BLOCK_SIZE : 0;
}

static uint32_t record_crc(const uint8_t *hdr, const void *data, uint64_t data_len) {
    uint32_t c = crc32c(0, hdr, 28);
    if (data_len) c = crc32c(c, data, (size_t)data_len);
    return c;
}

void wal_record_encode(uint8_t *hdr, const struct wal_record *r, const void *data) {
    put_le32(hdr, WAL_REC_MAGIC);
    hdr[4] = r->kind;
    hdr[5] = r->flags;
    put_le16(hdr + 6, 0);
    put_le64(hdr + 8, r->seq);
    put_le64(hdr + 16, r->lba);
    put_le32(hdr + 24, r->nblocks);
    put_le32(hdr + 28, record_crc(hdr, data, wal_record_data_len(r)));
}

int wal_record_decode_header(const uint8_t *buf, size_t len, struct wal_record *out) {
    if (len < WAL_REC_HDR_SIZE) return WAL_DECODE_SHORT;
    if (get_le32(buf) != WAL_REC_MAGIC) return WAL_DECODE_BAD;
    out->kind = buf[4];
    out->flags = buf[5];
    if (get_le16(buf + 6) != 0 || out->flags != 0) return WAL_DECODE_BAD;
    out->seq = get_le64(buf + 8);
    out->lba = get_le64(buf + 16);
    out->nblocks = get_le32(buf + 24);
    out->crc = get_le32(buf + 28);
    if (out->seq == 0 || out->nblocks == 0) return WAL_DECODE_BAD;
    switch (out->kind) {
    case WAL_KIND_DATA:
        if (out->nblocks > WAL_MAX_RECORD_BLOCKS) return WAL_DECODE_BAD;
        break;
    case WAL_KIND_ZERO_HOLE:
    case WAL_KIND_ZERO_ALLOC:
        if (out->nblocks > WAL_MAX_ZERO_BLOCKS) return WAL_DECODE_BAD;
        break;
    default:
        return WAL_DECODE_BAD;
    }
    if (out->lba > UINT64_MAX - out->nblocks) return WAL_DECODE_BAD;
    return WAL_DECODE_OK;
}

int wal_record_check(const uint8_t *hdr, const struct wal_record *r, const void *data) {
    return record_crc(hdr, data, wal_record_data_len(r)) == r->crc ? WAL_DECODE_OK : WAL_DECODE_BAD;
}

int wal_record_decode(const uint8_t *buf, size_t len, struct wal_record *out, size_t *total) {
    int rc = wal_record_decode_header(buf, len, out);
    if (rc != WAL_DECODE_OK) return rc;
    uint64_t need = WAL_REC_HDR_SIZE + wal_record_data_len(out);
    if (len < need) return WAL_DECODE_SHORT;
    rc = wal_record_check(buf, out, buf + WAL_REC_HDR_SIZE);
    if (rc == WAL_DECODE_OK) *total = (size_t)need;
    return rc;
}

void wal_segment_header_encode(uint8_t *buf, const struct wal_segment_header *h) {
    memset(buf, 0, WAL_SEG_HDR_SIZE);
    put_le32(buf, WAL_SEG_MAGIC);
    put_le32(buf + 4, h->version);
    put_le64(buf + 8, h->seg_id);
    put_le64(buf + 16, h->start_seq);
    memcpy(buf + 24, h->volume_id, 16);
    put_le32(buf + 60, crc32c(0, buf, 60));
}

int wal_segment_header_decode(const uint8_t *buf, size_t len, struct wal_segment_header *out) {
    if (len < WAL_SEG_HDR_SIZE) return WAL_DECODE_SHORT;
    if (get_le32(buf) != WAL_SEG_MAGIC) return WAL_DECODE_BAD;
    if (crc32c(0, buf, 60) != get_le32(buf + 60)) return WAL_DECODE_BAD;
    /* reserved bytes are zero in every version-1 header: anything else is
     * not ours, even with a matching checksum */
    for (int i = 40; i < 60; i++)
        if (buf[i]) return WAL_DECODE_BAD;
    out->version = get_le32(buf + 4);
    if (out->version != WAL_FORMAT_VERSION) return WAL_DECODE_BAD;
    out->seg_id = get_le64(buf + 8);
    out->start_seq = get_le64(buf + 16);
    memcpy(out->volume_id, buf + 24, 16);
    if (out->start_seq == 0) return WAL_DECODE_BAD;
    return WAL_DECODE_OK;
}
