/* crc32c.h — CRC-32C (Castagnoli), the checksum of WAL records and the state file.
 * Uses the SSE4.2 instruction when the CPU has it, a table otherwise; both give
 * the same value, which the unit tests check. */
#ifndef GLIDE_CRC32C_H
#define GLIDE_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/* crc32c(0, buf, len) starts a checksum; pass the previous result to continue it. */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);

#endif
