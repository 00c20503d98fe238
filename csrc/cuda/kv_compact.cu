// Launchers of the KV-cache compaction kernels (msd/kv_compact.cuh).
#include <cstdint>

#include "cuda/launchers.h"
#include "msd/kv_compact.cuh"

namespace msd::cuda {

template <typename Vec>
static cudaError_t launch_compact_rows(void* kv_cache, const int64_t* accepted_index, const int64_t* num_accepted,
                                       const int32_t* prefix_len, int64_t blocks, int64_t batch, int64_t heads,
                                       int64_t max_len, int64_t row_bytes, int64_t width, cudaStream_t stream) {
  compact_rows_kernel<Vec><<<static_cast<unsigned>(blocks), kCompactThreads, 0, stream>>>(
      static_cast<Vec*>(kv_cache), accepted_index, num_accepted, prefix_len, batch, heads, max_len,
      row_bytes / static_cast<int64_t>(sizeof(Vec)), width);
  return cudaGetLastError();
}

cudaError_t kv_compact(void* kv_cache, const int64_t* accepted_index, const int64_t* num_accepted,
                       int32_t* prefix_len, int64_t planes, int64_t batch, int64_t heads, int64_t max_len,
                       int64_t row_bytes, int64_t width, cudaStream_t stream) {
  if (width < 1 || width > kMaxTreeTokens) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const int64_t blocks = planes * batch * heads;
  if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  if (blocks > 0 && row_bytes > 0) {
    // The widest access that divides the row size and the base address (so every row's):
    // 16 bytes for fp16/bf16 rows with D % 8 == 0, narrower otherwise.
    const uint64_t alignment = reinterpret_cast<uintptr_t>(kv_cache) | static_cast<uint64_t>(row_bytes);
    const auto launch = [&](auto word) {
      return launch_compact_rows<decltype(word)>(kv_cache, accepted_index, num_accepted, prefix_len, blocks, batch,
                                                 heads, max_len, row_bytes, width, stream);
    };
    const cudaError_t status = alignment % 16 == 0 ? launch(uint4{})
                               : alignment % 8 == 0 ? launch(uint2{})
                               : alignment % 4 == 0 ? launch(uint32_t{})
                               : alignment % 2 == 0 ? launch(uint16_t{})
                                                    : launch(uint8_t{});
    if (status != cudaSuccess) return status;
  }
  const int64_t prefix_blocks = (batch + kPrefixThreads - 1) / kPrefixThreads;
  advance_prefix_kernel<<<static_cast<unsigned>(prefix_blocks), kPrefixThreads, 0, stream>>>(
      accepted_index, num_accepted, prefix_len, batch, max_len, width);
  return cudaGetLastError();
}

}  // namespace msd::cuda
