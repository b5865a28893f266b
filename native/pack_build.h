/* pack_build.h — builds one pack (the format documented in glide/pack.py,
 * version 1) from a volume's blocks as of a WAL sequence number.
 *
 * Two calls so the caller can allocate the output where it likes (module.c
 * allocates a Python bytes object of exactly pack_build_size() bytes, with the
 * GIL held, between them): pack_build_run does all the reading, hashing,
 * deduplication and compression; pack_build_emit only lays the result out.
 */
#ifndef GLIDE_PACK_BUILD_H
#define GLIDE_PACK_BUILD_H

#include <stddef.h>
#include <stdint.h>

struct volume;
struct pack_build;

/* The pack format's limits, which every decoder in glide/pack.py enforces. */
#define PACK_MAX_ENTRIES (1u << 20)
#define PACK_MAX_THREADS 16

/* Whether zstd accepts this compression level. */
int pack_build_level_ok(int level);

/* Reads lbas[0..n) as of `as_of` (UINT64_MAX: the current content), leaves
 * zero blocks out and stores each distinct content once, compressed at zstd
 * `level`, using `threads` threads (the calling one included). Returns 0 and
 * *out, or -errno (-EINVAL for an lba past the volume or n over
 * PACK_MAX_ENTRIES, -ENOMEM, or the read's error) and nothing. */
int pack_build_run(struct volume *v, const uint64_t *lbas, size_t n, uint64_t as_of, int level, int threads,
                   struct pack_build **out);

/* Bytes of the finished pack; 0 when no block needs storing (all zero, or
 * n == 0): an empty pack is never written. */
size_t pack_build_size(const struct pack_build *pb);

/* entries[i]: the entry number of lbas[i] in the pack, or -1 for a zero block. */
const int32_t *pack_build_entries(const struct pack_build *pb);

/* Writes the pack_build_size() bytes of the pack into out. */
void pack_build_emit(const struct pack_build *pb, uint8_t *out);

void pack_build_free(struct pack_build *pb);

#endif
