// Shared definitions for kernel code that compiles both as host C++ and as CUDA.
// Framework-free: no torch headers here (see ARCHITECTURE.md).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSD_HOST_DEVICE __host__ __device__
#define MSD_INLINE __forceinline__
#else
#define MSD_HOST_DEVICE
#define MSD_INLINE inline
#endif

namespace msd {

// Number of 64-bit words in one row of a packed mask over `num_tokens` tokens.
MSD_HOST_DEVICE MSD_INLINE int64_t mask_words(int64_t num_tokens) { return (num_tokens + 63) / 64; }

// Whether bit `j` is set in a packed mask row `row` ([mask_words(N)] int64 words).
MSD_HOST_DEVICE MSD_INLINE bool mask_test(const int64_t* row, int64_t j) {
  return (static_cast<uint64_t>(row[j >> 6]) >> (j & 63)) & 1u;
}

// Set bit `j` in a packed mask row.
MSD_HOST_DEVICE MSD_INLINE void mask_set(int64_t* row, int64_t j) {
  row[j >> 6] = static_cast<int64_t>(static_cast<uint64_t>(row[j >> 6]) | (uint64_t{1} << (j & 63)));
}

}  // namespace msd
