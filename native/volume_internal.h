/* volume_internal.h — what the files of one volume share with each other and
 * with nothing else (the rest of the core uses volume.h).
 *
 *   volume.c      open/close, write path, read path, block status
 *   checkpoint.c  write-back, checkpoint, the state file on disk
 *   miss.c        read-through: parking, the fetcher's queue, install, fail
 *   evict.c       eviction (batches, CLOCK sweep)
 *   state_file.c  the state file's byte layout (pure, fuzzed; state_file.h)
 *
 * Lock order (volume.h): evict_mu -> ckpt_mu -> wal.mu -> evict_rw -> idx_mu
 * -> miss_mu. Each declaration says which locks its caller must hold.
 */
#ifndef GLIDE_VOLUME_INTERNAL_H
#define GLIDE_VOLUME_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "state_file.h"
#include "volume.h"

/* ---- volume.c ---- */

/* Whole-buffer pread/pwrite retrying short transfers and EINTR; a read past
 * the end of the file fills zeros (the cache file is sparse). 0 or -errno. */
int pread_full(int fd, void *buf, size_t len, uint64_t off);
int pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
/* Record the first unrecoverable error; the volume refuses work from then on. */
void set_failed(struct volume *v, int err);

/* ---- checkpoint.c ---- */

/* The runs of the state file, encoded from the index. Caller holds idx_mu
 * (or owns the index alone). */
int encode_state(struct volume *v, struct state_image *img);
/* Seal img and replace the state file atomically and durably. Caller holds
 * ckpt_mu. Consumes img. */
int write_state_file(struct volume *v, struct state_image *img, uint64_t ckpt_seq, uint64_t *bytes_out);
/* At open, before the index is shared: decode the state file into v->bi and
 * v's identity; *file_nblocks is the size it records (less than v->nblocks
 * when the volume grew). -ENOENT when there is none; other errors fill err. */
int read_state_file(struct volume *v, uint64_t *ckpt_seq, uint64_t *file_nblocks, char *err, size_t errlen);
/* 0 if the state file is still the one read_state_file read (a passive
 * volume's check before activation); -ESTALE with err filled if not. */
int state_file_unchanged(struct volume *v, char *err, size_t errlen);
/* Write the index's current base states as a state file with this
 * checkpoint sequence (what eviction batches and grow do): snapshot under
 * idx_mu, sync installs, replace atomically. Caller holds ckpt_mu. */
int persist_state_locked(struct volume *v, uint64_t ckpt_seq, uint64_t *bytes_out);
/* fdatasync the cache file if installs since the last sync are about to be
 * recorded as CLEAN; `seen` is the install count read under idx_mu with the
 * snapshot. Caller holds ckpt_mu. */
int sync_installs(struct volume *v, uint64_t seen);

/* ---- miss.c ---- */

#define MISS_BUCKETS 4096u

struct miss_entry {
    uint64_t lba;
    struct miss_waiter *waiters;
    struct miss_entry *next;
};

/* Queue lba for the fetcher unless already waiting; park w on it if given.
 * Caller holds idx_mu; takes miss_mu. -ENOMEM leaves nothing registered. */
int miss_register(struct volume *v, uint64_t lba, struct miss_waiter *w);
/* Remove lba's entry and return its waiters (to fire with no lock held). */
struct miss_waiter *miss_resolve(struct volume *v, uint64_t lba);
void miss_fire(struct miss_waiter *ws, int err);
/* At close: fail whatever still waits and free the table and queue. */
void miss_table_free(struct volume *v);

#endif
