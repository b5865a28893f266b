/* libFuzzer target: WAL replay over an arbitrary segment body. The input
 * (after a valid segment header) becomes a segment file; replay must accept
 * only in-order, checksummed records, never read past the file, and leave a
 * log that appends and replays again. */
#define _GNU_SOURCE
#include <assert.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../wal.h"

static char dir[256];
static const uint8_t vid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

struct ctx { uint64_t last; int n; };

static int apply(void *c, const struct wal_record *r, struct wal_segment *seg, uint64_t off) {
    (void)seg;
    (void)off;
    struct ctx *x = c;
    assert(r->seq == x->last + 1 || x->n == 0);
    x->last = r->seq;
    x->n++;
    return 0;
}

static void clean(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -f %s/*.seg", dir);
    if (system(cmd) != 0) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/glide-fuzz-wal-%d", (int)getpid());
        mkdir(dir, 0700);
    }
    clean();
    char path[300];
    snprintf(path, sizeof path, "%s/%016llx.seg", dir, 1ULL);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    uint8_t hdr[WAL_SEG_HDR_SIZE];
    struct wal_segment_header h = {.version = WAL_FORMAT_VERSION, .seg_id = 1, .start_seq = 1};
    memcpy(h.volume_id, vid, 16);
    wal_segment_header_encode(hdr, &h);
    if (write(fd, hdr, sizeof hdr) != (ssize_t)sizeof hdr || write(fd, data, size) != (ssize_t)size) abort();
    close(fd);

    struct wal w;
    struct wal_replay_stats st;
    struct ctx c = {0};
    char err[256];
    int rc = wal_open(&w, dir, vid, 64 << 20, 0, apply, &c, &st, err, sizeof err);
    if (rc == 0) {
        assert(st.applied == (uint64_t)c.n);
        struct wal_append_result res;
        pthread_mutex_lock(&w.mu);
        rc = wal_append_locked(&w, WAL_KIND_ZERO_HOLE, 0, 1, NULL, &res);
        pthread_mutex_unlock(&w.mu);
        assert(rc == 0 && res.seq == st.last_seq + 1);
        wal_close(&w);
        /* and it replays again, with the new record */
        struct ctx c2 = {0};
        rc = wal_open(&w, dir, vid, 64 << 20, 0, apply, &c2, &st, err, sizeof err);
        assert(rc == 0 && c2.n == c.n + 1);
        wal_close(&w);
    }
    return 0;
}
