/* libFuzzer target: WAL record and segment header decoders. A record that
 * decodes must re-encode to the same bytes (the checksum covers everything). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../wal_record.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct wal_record r;
    size_t total = 0;
    if (wal_record_decode(data, size, &r, &total) == WAL_DECODE_OK) {
        assert(total == WAL_REC_HDR_SIZE + wal_record_data_len(&r) && total <= size);
        uint8_t hdr[WAL_REC_HDR_SIZE];
        wal_record_encode(hdr, &r, data + WAL_REC_HDR_SIZE);
        assert(memcmp(hdr, data, WAL_REC_HDR_SIZE) == 0);
    }
    struct wal_segment_header h;
    if (wal_segment_header_decode(data, size, &h) == WAL_DECODE_OK) {
        uint8_t buf[WAL_SEG_HDR_SIZE];
        wal_segment_header_encode(buf, &h);
        assert(memcmp(buf, data, WAL_SEG_HDR_SIZE) == 0);
    }
    return 0;
}
