// CRC32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78), as used by
// iSCSI, ext4 and LevelDB: the checksum of every tensor in a checkpoint.
//
// Uses the SSE4.2 crc32 instruction when the CPU has it (checked once at run
// time), else a table-driven slice-by-8 loop; both give identical results.
//
// Thread-safety: pure functions. The caller owns `data`.
#ifndef DISTVAL_CRC32C_H_
#define DISTVAL_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace distval {

// Extends `crc` (the CRC32C of some bytes A, 0 for none) by `n` bytes at
// `data`: returns the CRC32C of A followed by those bytes. Crc32cExtend(0, d, n)
// is the CRC32C of d[0, n). `data` may be null when n is 0.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);

// CRC32C of d[0, n).
inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }

// The table-driven implementation alone (for tests comparing both paths).
uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t n);

}  // namespace distval

#endif  // DISTVAL_CRC32C_H_
