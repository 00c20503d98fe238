// CUDA kernels of kv_compact (semantics: msd_kernels/reference.py): compact_rows_kernel
// moves the accepted K/V rows of every (plane, sequence, head) in one launch, then
// advance_prefix_kernel advances prefix_len. Launchers: csrc/cuda/kv_compact.cu.
//
// Why two launches: all blocks of a sequence read prefix_len[b] to locate its rows, and
// blocks of one launch run in no fixed order, so no block may advance it while others might
// still read it. The second launch, on the same stream, starts after every copy is done.
#pragma once

#include <cstdint>

#include "msd/cuda_common.cuh"
#include "msd/launch_types.h"

namespace msd::cuda {

inline constexpr int kCompactThreads = 128;
inline constexpr int kPrefixThreads = 128;
// Shared staging of one column chunk of every moved row: at least kMaxTreeTokens words of
// the widest access (16 bytes), so a chunk always holds one column of a + 1 <= A rows.
inline constexpr int kStageBytes = 16 * kMaxTreeTokens;

// Whether sequence b's move stays inside its cache: 0 <= a < A, the destinations prefix ..
// prefix + a and every source prefix + accepted_row[j] are rows of the cache. This thread
// checks j = first, first + stride, ...; a block combines its threads' answers. Sequences
// that fail (bad input, which the reference rejects) are left untouched.
__device__ inline bool move_in_range(const int64_t* accepted_row,  // [A] int64, row b
                                     int64_t num_accepted, int64_t width, int64_t prefix,
                                     int64_t max_len, int64_t first, int64_t stride) {
  if (num_accepted < 0 || num_accepted >= width || prefix < 0 || prefix + num_accepted >= max_len) return false;
  for (int64_t j = first; j <= num_accepted; j += stride) {
    if (accepted_row[j] < 0 || accepted_row[j] >= max_len - prefix) return false;
  }
  return true;
}

// One block per (plane n, sequence b, head h), blockIdx.x = (n * B + b) * H + h: copies rows
// prefix + accepted_index[b, j] to prefix + j, j = 0 .. a, one column chunk at a time; each
// chunk of every row is read into shared memory before any is written (ranges overlap).
// `Vec` is the widest word (up to 16 bytes) dividing the row size and the base address.
template <typename Vec>
__global__ void __launch_bounds__(kCompactThreads) compact_rows_kernel(
    Vec* __restrict__ kv_cache,                  // [N, B, H, S, row_words], a row = D elements
    const int64_t* __restrict__ accepted_index,  // [B, A] int64, A <= kMaxTreeTokens
    const int64_t* __restrict__ num_accepted,    // [B] int64
    const int32_t* __restrict__ prefix_len,      // [B] int32, read only here
    int64_t batch, int64_t heads,
    int64_t max_len,    // S
    int64_t row_words,  // D * element size / sizeof(Vec)
    int64_t width) {    // A
  __shared__ Vec staged[kStageBytes / sizeof(Vec)];
  __shared__ int64_t source[kMaxTreeTokens];  // cache row of accepted row j
  const int64_t b = (blockIdx.x / heads) % batch;
  const int64_t prefix = prefix_len[b];
  const int64_t* accepted_row = accepted_index + b * width;
  if (__syncthreads_or(!move_in_range(accepted_row, num_accepted[b], width, prefix, max_len, threadIdx.x, blockDim.x))) {
    return;
  }
  const int64_t rows = num_accepted[b] + 1;
  for (int64_t j = threadIdx.x; j < rows; j += blockDim.x) source[j] = prefix + accepted_row[j];
  __syncthreads();

  Vec* head = kv_cache + blockIdx.x * max_len * row_words;
  const int64_t chunk = MinOp{}(row_words, static_cast<int64_t>(kStageBytes / sizeof(Vec)) / rows);
  for (int64_t column = 0; column < row_words; column += chunk) {
    const int64_t columns = MinOp{}(chunk, row_words - column);
    for (int64_t e = threadIdx.x; e < rows * columns; e += blockDim.x) {
      staged[e] = head[source[e / columns] * row_words + column + e % columns];
    }
    __syncthreads();  // gather before scatter: a destination row may be another row's source
    for (int64_t e = threadIdx.x; e < rows * columns; e += blockDim.x) {
      head[(prefix + e / columns) * row_words + column + e % columns] = staged[e];
    }
    __syncthreads();  // `staged` is refilled by the next chunk
  }
}

// One thread per sequence, after compact_rows_kernel: prefix_len[b] += a + 1 where the move
// was in range (the same test, on the same not yet advanced prefix_len).
static __global__ void __launch_bounds__(kPrefixThreads) advance_prefix_kernel(
    const int64_t* __restrict__ accepted_index,  // [B, A] int64
    const int64_t* __restrict__ num_accepted,    // [B] int64
    int32_t* __restrict__ prefix_len,            // [B] int32, advanced in place
    int64_t batch, int64_t max_len, int64_t width) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  if (move_in_range(accepted_index + b * width, num_accepted[b], width, prefix_len[b], max_len, 0, 1)) {
    prefix_len[b] += static_cast<int32_t>(num_accepted[b] + 1);
  }
}

}  // namespace msd::cuda
