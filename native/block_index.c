/* block_index.c — state bytes + an open-addressing map lba -> version chain.
 * Linear probing with backward-shift deletion keeps lookups short without
 * tombstones; versions live in one arena with a free list. The state array is
 * an anonymous mapping: its pages cost memory only once written, and growing
 * it is an mremap that neither copies nor touches the pages it keeps. */
#define _GNU_SOURCE
#include "block_index.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "wal_record.h"

#define EMPTY_KEY UINT64_MAX

struct slot {
    uint64_t lba;
    uint32_t head;
};

struct block_index {
    uint64_t nblocks;
    uint8_t *state;
    size_t state_len; /* bytes mapped: nblocks rounded up to whole pages */
    struct slot *slots;
    uint64_t cap; /* power of two */
    uint64_t used;
    struct block_version *vers;
    uint32_t vcap, vtop, vfree, vlive;
    uint64_t cached; /* blocks whose base is CLEAN */
};

static uint64_t hash64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static struct slot *alloc_slots(uint64_t cap) {
    struct slot *s = malloc(cap * sizeof *s);
    if (!s) return NULL;
    for (uint64_t i = 0; i < cap; i++) { s[i].lba = EMPTY_KEY; s[i].head = 0; }
    return s;
}

static size_t state_bytes(uint64_t nblocks) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return ((size_t)(nblocks ? nblocks : 1) + page - 1) & ~(page - 1);
}

struct block_index *block_index_create(uint64_t nblocks) {
    struct block_index *bi = calloc(1, sizeof *bi);
    if (!bi) return NULL;
    bi->nblocks = nblocks;
    bi->state_len = state_bytes(nblocks);
    bi->state = mmap(NULL, bi->state_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bi->state == MAP_FAILED) bi->state = NULL;
    bi->cap = 1024;
    bi->slots = alloc_slots(bi->cap);
    bi->vcap = 1024;
    bi->vers = malloc(bi->vcap * sizeof *bi->vers);
    bi->vtop = 1; /* index 0 means "none" */
    if (!bi->state || !bi->slots || !bi->vers) { block_index_destroy(bi); return NULL; }
    return bi;
}

void block_index_destroy(struct block_index *bi) {
    if (!bi) return;
    if (bi->state) munmap(bi->state, bi->state_len);
    free(bi->slots); free(bi->vers); free(bi);
}

int block_index_grow(struct block_index *bi, uint64_t nblocks) {
    if (nblocks <= bi->nblocks) return 0;
    size_t len = state_bytes(nblocks);
    if (len != bi->state_len) {
        /* The pages added are zero (ABSENT, not REMOTE), and so is the tail of
         * the last old page: nothing ever writes past nblocks. */
        void *p = mremap(bi->state, bi->state_len, len, MREMAP_MAYMOVE);
        if (p == MAP_FAILED) return -1;
        bi->state = p;
        bi->state_len = len;
    }
    bi->nblocks = nblocks;
    return 0;
}

uint64_t block_index_nblocks(const struct block_index *bi) { return bi->nblocks; }
uint8_t block_index_state(const struct block_index *bi, uint64_t lba) { return bi->state[lba]; }
const uint8_t *block_index_states(const struct block_index *bi) { return bi->state; }
uint64_t block_index_cached_count(const struct block_index *bi) { return bi->cached; }

void block_index_set_base(struct block_index *bi, uint64_t lba, uint8_t base) {
    uint8_t old = bi->state[lba];
    base &= BLOCK_BASE_MASK;
    uint8_t s = (uint8_t)((old & ~BLOCK_BASE_MASK) | base);
    if (base != BLOCK_CLEAN) s &= (uint8_t)~BLOCK_REFERENCED;
    int was = (old & BLOCK_BASE_MASK) == BLOCK_CLEAN, is = base == BLOCK_CLEAN;
    if (is && !was) bi->cached++;
    else if (was && !is) bi->cached--;
    /* Leave untouched pages of the calloc'd array unwritten (never faulted in). */
    if (s != old) bi->state[lba] = s;
}
void block_index_set_remote(struct block_index *bi, uint64_t lba, int on) {
    if (on) bi->state[lba] |= BLOCK_REMOTE;
    else if (bi->state[lba] & BLOCK_REMOTE) bi->state[lba] &= (uint8_t)~BLOCK_REMOTE;
}
void block_index_set_referenced(struct block_index *bi, uint64_t lba, int on) {
    if (on) bi->state[lba] |= BLOCK_REFERENCED;
    else if (bi->state[lba] & BLOCK_REFERENCED) bi->state[lba] &= (uint8_t)~BLOCK_REFERENCED;
}
void block_index_set_bypassed(struct block_index *bi, uint64_t lba, int on) {
    if (on) bi->state[lba] |= BLOCK_BYPASSED;
    else if (bi->state[lba] & BLOCK_BYPASSED) bi->state[lba] &= (uint8_t)~BLOCK_BYPASSED;
}
uint64_t block_index_dirty_count(const struct block_index *bi) { return bi->used; }
uint64_t block_index_version_count(const struct block_index *bi) { return bi->vlive; }

static struct slot *find(const struct block_index *bi, uint64_t lba) {
    uint64_t mask = bi->cap - 1;
    for (uint64_t i = hash64(lba) & mask;; i = (i + 1) & mask) {
        if (bi->slots[i].lba == lba) return &bi->slots[i];
        if (bi->slots[i].lba == EMPTY_KEY) return NULL;
    }
}

static int grow(struct block_index *bi) {
    uint64_t ncap = bi->cap * 2;
    struct slot *ns = alloc_slots(ncap);
    if (!ns) return -1;
    for (uint64_t i = 0; i < bi->cap; i++) {
        if (bi->slots[i].lba == EMPTY_KEY) continue;
        uint64_t j = hash64(bi->slots[i].lba) & (ncap - 1);
        while (ns[j].lba != EMPTY_KEY) j = (j + 1) & (ncap - 1);
        ns[j] = bi->slots[i];
    }
    free(bi->slots);
    bi->slots = ns;
    bi->cap = ncap;
    return 0;
}

static struct slot *find_or_insert(struct block_index *bi, uint64_t lba) {
    if ((bi->used + 1) * 2 > bi->cap && grow(bi) < 0) return NULL;
    uint64_t mask = bi->cap - 1;
    for (uint64_t i = hash64(lba) & mask;; i = (i + 1) & mask) {
        if (bi->slots[i].lba == lba) return &bi->slots[i];
        if (bi->slots[i].lba == EMPTY_KEY) {
            bi->slots[i].lba = lba;
            bi->slots[i].head = 0;
            bi->used++;
            return &bi->slots[i];
        }
    }
}

static void erase(struct block_index *bi, struct slot *s) {
    uint64_t mask = bi->cap - 1;
    uint64_t i = (uint64_t)(s - bi->slots);
    bi->slots[i].lba = EMPTY_KEY;
    bi->used--;
    /* Backward shift: pull later members of the probe run into the gap. */
    for (uint64_t j = (i + 1) & mask; bi->slots[j].lba != EMPTY_KEY; j = (j + 1) & mask) {
        uint64_t home = hash64(bi->slots[j].lba) & mask;
        /* slot j may move to i if its home is not within (i, j] cyclically */
        int movable = (i <= j) ? (home <= i || home > j) : (home <= i && home > j);
        if (movable) {
            bi->slots[i] = bi->slots[j];
            bi->slots[j].lba = EMPTY_KEY;
            i = j;
        }
    }
}

static uint32_t version_alloc(struct block_index *bi) {
    uint32_t v;
    if (bi->vfree) {
        v = bi->vfree;
        bi->vfree = bi->vers[v].next;
    } else {
        if (bi->vtop == bi->vcap) {
            if (bi->vcap >= UINT32_MAX / 2) return 0;
            struct block_version *nv = realloc(bi->vers, (size_t)bi->vcap * 2 * sizeof *nv);
            if (!nv) return 0;
            bi->vers = nv;
            bi->vcap *= 2;
        }
        v = bi->vtop++;
    }
    bi->vlive++;
    return v;
}

static void version_free(struct block_index *bi, uint32_t v) {
    bi->vers[v].next = bi->vfree;
    bi->vfree = v;
    bi->vlive--;
}

int block_index_add_version(struct block_index *bi, uint64_t lba, uint64_t seq, uint8_t kind,
                            struct wal_segment *seg, uint64_t off) {
    uint32_t v = version_alloc(bi);
    if (!v) return -1;
    struct slot *s = find_or_insert(bi, lba);
    if (!s) { version_free(bi, v); return -1; }
    struct block_version *nv = &bi->vers[v];
    nv->seq = seq; nv->off = off; nv->seg = seg; nv->kind = kind;
    uint32_t *link = &s->head;
    while (*link && bi->vers[*link].seq > seq) link = &bi->vers[*link].next;
    nv->next = *link;
    *link = v;
    bi->state[lba] |= BLOCK_DIRTY;
    return 0;
}

const struct block_version *block_index_latest(const struct block_index *bi, uint64_t lba) {
    if (!(bi->state[lba] & BLOCK_DIRTY)) return NULL;
    const struct slot *s = find(bi, lba);
    return (s && s->head) ? &bi->vers[s->head] : NULL;
}

const struct block_version *block_index_as_of(const struct block_index *bi, uint64_t lba, uint64_t as_of) {
    if (!(bi->state[lba] & BLOCK_DIRTY)) return NULL;
    const struct slot *s = find(bi, lba);
    if (!s) return NULL;
    for (uint32_t v = s->head; v; v = bi->vers[v].next)
        if (bi->vers[v].seq <= as_of) return &bi->vers[v];
    return NULL;
}

int block_index_visit_upto(const struct block_index *bi, uint64_t upto, block_visit_fn fn, void *ctx) {
    for (uint64_t i = 0; i < bi->cap; i++) {
        const struct slot *s = &bi->slots[i];
        if (s->lba == EMPTY_KEY) continue;
        for (uint32_t v = s->head; v; v = bi->vers[v].next) {
            if (bi->vers[v].seq <= upto) {
                int rc = fn(ctx, s->lba, &bi->vers[v]);
                if (rc) return rc;
                break;
            }
        }
    }
    return 0;
}

int64_t block_index_drop_upto(struct block_index *bi, uint64_t upto, block_uncached_fn on_uncached, void *ctx) {
    int64_t cleaned = 0;
    int failed = 0;
    for (uint64_t i = 0; i < bi->cap;) {
        struct slot *s = &bi->slots[i];
        if (s->lba == EMPTY_KEY) { i++; continue; }
        uint32_t *link = &s->head;
        while (*link && bi->vers[*link].seq > upto) link = &bi->vers[*link].next;
        if (*link) {
            uint8_t kind = bi->vers[*link].kind, old = bi->state[s->lba];
            uint8_t base = kind == WAL_KIND_ZERO_HOLE ? BLOCK_ZERO : BLOCK_CLEAN;
            if (kind == WAL_KIND_DATA && (old & BLOCK_BYPASSED)) {
                base = BLOCK_ABSENT;
                if ((old & BLOCK_BASE_MASK) == BLOCK_CLEAN && on_uncached && on_uncached(ctx, s->lba))
                    failed = 1;
            }
            block_index_set_base(bi, s->lba, base);
            uint32_t v = *link;
            *link = 0;
            while (v) { uint32_t nx = bi->vers[v].next; version_free(bi, v); v = nx; }
        }
        if (!s->head) {
            bi->state[s->lba] &= (uint8_t)~(BLOCK_DIRTY | BLOCK_BYPASSED);
            cleaned++;
            erase(bi, s); /* may shift a later slot into i: look at i again */
            continue;
        }
        i++;
    }
    return failed ? -1 : cleaned;
}
