/* crc32c.c — CRC-32C with a hardware path (SSE4.2 crc32 instruction) chosen once
 * at first use, and a slice-by-1 table fallback that is also the reference the
 * tests compare against. */
#include "crc32c.h"

#include <stdatomic.h>

static uint32_t table[256];
static atomic_int table_ready;

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
    atomic_store(&table_ready, 1);
}

uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len) {
    if (!atomic_load(&table_ready)) build_table();
    const uint8_t *p = buf;
    crc = ~crc;
    while (len--) crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len) {
    const uint8_t *p = buf;
    uint64_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) { c = __builtin_ia32_crc32qi((uint32_t)c, *p++); len--; }
    while (len >= 8) {
        uint64_t v;
        __builtin_memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8; len -= 8;
    }
    while (len--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

uint32_t crc32c(uint32_t crc, const void *buf, size_t len) {
#if defined(__x86_64__)
    static int have_hw = -1;
    if (have_hw < 0) {
        __builtin_cpu_init();
        have_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    if (have_hw) return crc32c_hw(crc, buf, len);
#endif
    return crc32c_sw(crc, buf, len);
}
