/* block_index.h — the per-volume map of block states and dirty versions.
 *
 * Each block has one state byte: a base state (what the cache file or the
 * store holds for it as of the last checkpoint) and flags. Layout:
 *   bits 0-1 base (ABSENT, CLEAN, ZERO)   bit 3 REMOTE      (persisted)
 *   bit 2    DIRTY (rebuilt by replay)    bit 4 REFERENCED  (CLOCK, volatile)
 *   bits 5-7 spare
 * A dirty block also has a chain of versions, newest first, each naming the
 * WAL record that holds it (segment, byte offset of the block's data, sequence
 * number). Keeping every version newer than the last checkpoint is what lets
 * a flusher read a block "as of" a sequence number while later writes keep
 * landing.
 *
 * Not thread-safe: the owning volume serialises access with its index mutex,
 * and that includes the state array returned by block_index_states, which
 * block_index_grow may move.
 * Memory: the state array is an anonymous mapping (untouched pages are never
 * faulted in, also after a grow), versions are bounded by the WAL budget.
 */
#ifndef GLIDE_BLOCK_INDEX_H
#define GLIDE_BLOCK_INDEX_H

#include <stddef.h>
#include <stdint.h>

enum block_base {
    BLOCK_ABSENT = 0, /* not local: the store has it, or it is zeros if the store has no entry */
    BLOCK_CLEAN = 1,  /* the cache file holds it */
    BLOCK_ZERO = 2,   /* known to be zeros; the cache file has a hole */
};
#define BLOCK_BASE_MASK 0x3
#define BLOCK_DIRTY 0x4
/* The object store's committed manifest holds non-zero content for the block:
 * an ABSENT block with REMOTE is fetched on read, one without reads as zeros. */
#define BLOCK_REMOTE 0x8
/* CLOCK's referenced bit: set when a read is served from the cache file or the
 * block is installed, cleared by the eviction hand as it passes. Only meaningful
 * while the base is CLEAN (set_base clears it otherwise); never persisted, so a
 * restarted volume starts with every block unreferenced. */
#define BLOCK_REFERENCED 0x10
/* The sequential cutoff: a write-back left this DIRTY block's newest version
 * <= written_back_seq out of the cache file, because a long run of blocks is
 * served better by the store than by a second local copy. The checkpoint that
 * drops that version makes the block ABSENT instead of CLEAN (its caller
 * committed the version to the store first), or copies it after all when the
 * caller promises no such commit. Cleared when the block stops being DIRTY;
 * never persisted (replay rebuilds DIRTY blocks, and the next write-back
 * decides again). Bits 6-7 are spare. */
#define BLOCK_BYPASSED 0x20
/* What the state file keeps per block (DIRTY is rebuilt by replay). */
#define BLOCK_PERSISTED_MASK (BLOCK_BASE_MASK | BLOCK_REMOTE)

struct wal_segment;

struct block_version {
    uint64_t seq;
    uint64_t off;             /* byte offset of this block's data in the segment */
    struct wal_segment *seg;  /* NULL for zero kinds */
    uint32_t next;            /* older version, 0 = none */
    uint8_t kind;             /* enum wal_kind */
};

struct block_index;

struct block_index *block_index_create(uint64_t nblocks);
void block_index_destroy(struct block_index *bi);

uint64_t block_index_nblocks(const struct block_index *bi);
/* More blocks, all ABSENT and not REMOTE; never fewer. Moves the state array
 * (pointers from block_index_states die). 0, or -1 on ENOMEM. */
int block_index_grow(struct block_index *bi, uint64_t nblocks);
uint8_t block_index_state(const struct block_index *bi, uint64_t lba);
/* The whole state array, for bulk scans (state file encoding, the eviction
 * hand) that would otherwise cost a call per block. Read-only. */
const uint8_t *block_index_states(const struct block_index *bi);
void block_index_set_base(struct block_index *bi, uint64_t lba, uint8_t base);
void block_index_set_remote(struct block_index *bi, uint64_t lba, int on);
void block_index_set_referenced(struct block_index *bi, uint64_t lba, int on);
void block_index_set_bypassed(struct block_index *bi, uint64_t lba, int on);
/* Blocks whose base is CLEAN, dirty or not: what the cache file holds. Kept
 * by set_base, so it costs nothing to read. */
uint64_t block_index_cached_count(const struct block_index *bi);

/* Record a new version (inserted in sequence order, so concurrent writers that
 * update the index out of order still leave the newest on top). -1 on ENOMEM. */
int block_index_add_version(struct block_index *bi, uint64_t lba, uint64_t seq, uint8_t kind,
                            struct wal_segment *seg, uint64_t off);

/* Newest version, or the newest with seq <= as_of; NULL if none. */
const struct block_version *block_index_latest(const struct block_index *bi, uint64_t lba);
const struct block_version *block_index_as_of(const struct block_index *bi, uint64_t lba, uint64_t as_of);

/* Call fn for every dirty block whose newest version <= upto exists. */
typedef int (*block_visit_fn)(void *ctx, uint64_t lba, const struct block_version *v);
int block_index_visit_upto(const struct block_index *bi, uint64_t upto, block_visit_fn fn, void *ctx);

/* Forget every version <= upto: each such block takes the base state its newest
 * dropped version implies (ABSENT for a BYPASSED data block: the cache file
 * does not hold it); blocks left with no versions stop being dirty (and
 * BYPASSED). For each block whose base goes from CLEAN to ABSENT, on_uncached
 * is called (may be NULL): its cache-file bytes are stale and may be punched
 * once a state file says ABSENT. Returns how many blocks stopped being dirty,
 * or -1 if on_uncached failed (the drop is then complete all the same). */
typedef int (*block_uncached_fn)(void *ctx, uint64_t lba);
int64_t block_index_drop_upto(struct block_index *bi, uint64_t upto, block_uncached_fn on_uncached, void *ctx);

uint64_t block_index_dirty_count(const struct block_index *bi);
uint64_t block_index_version_count(const struct block_index *bi);

#endif
