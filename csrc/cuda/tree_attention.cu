// Launch code of the CUDA tree_attention; the kernels and their tiling: msd/tree_attention.cuh.
#include "cuda/tree_attention_launch.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "msd/tree_attention.cuh"

namespace msd::cuda {
namespace {

using attention::kThreads;
using attention::kTileM;
using attention::kTileN;

// Upper bound on splits: keeps the float32 workspace a small multiple of the output.
constexpr int kMaxSplits = 32;
// Blocks aimed for per SM (two split blocks of <= 110 KB shared memory fit on sm_90).
constexpr int kBlocksPerSm = 2;

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

attention::Strides strides(const int64_t (&s)[3]) { return {s[0], s[1], s[2]}; }

template <typename T, int D>
cudaError_t launch(const TreeAttentionProblem& p, const TreeAttentionSplit& split, float* partial_out,
                   float* partial_lse, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const dim3 grid(p.batch * p.num_kv_heads, ceil_div(int64_t(group) * p.num_new, kTileM), split.num_splits);
  const int smem = attention::SplitSmem<T, D>::kBytes;
  auto* split_kernel = attention::tree_attention_split_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  split_kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(p.q), strides(p.q_strides), static_cast<const T*>(p.k_cache), strides(p.k_strides),
      static_cast<const T*>(p.v_cache), strides(p.v_strides), p.prefix_len, p.tree_mask, partial_out, partial_lse,
      p.num_q_heads, p.num_kv_heads, p.num_new, p.tree_len, p.max_len, split.tiles_per_split,
      p.scale * attention::kLog2e);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t rows = int64_t(p.batch) * p.num_q_heads * p.num_new;
  attention::tree_attention_merge_kernel<T, D><<<static_cast<unsigned>(rows), D, 0, stream>>>(
      partial_out, partial_lse, static_cast<T*>(p.out), rows, split.num_splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_head_dim(const TreeAttentionProblem& p, const TreeAttentionSplit& split,
                                float* partial_out, float* partial_lse, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, split, partial_out, partial_lse, stream);
    case 80: return launch<T, 80>(p, split, partial_out, partial_lse, stream);
    case 96: return launch<T, 96>(p, split, partial_out, partial_lse, stream);
    case 128: return launch<T, 128>(p, split, partial_out, partial_lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t tree_attention_split(const TreeAttentionProblem& p, TreeAttentionSplit* split) {
  int device = 0;
  int num_sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t blocks_per_split = int64_t(p.batch) * p.num_kv_heads * ceil_div(group * p.num_new, kTileM);
  const int key_tiles = ceil_div(p.max_len, kTileN);
  // Enough splits to fill the GPU when batch x heads x query tiles does not.
  const int wanted = ceil_div(int64_t(kBlocksPerSm) * num_sms, std::max<int64_t>(blocks_per_split, 1));
  const int splits = std::max(1, std::min({wanted, key_tiles, kMaxSplits}));
  split->tiles_per_split = ceil_div(key_tiles, splits);
  split->num_splits = ceil_div(key_tiles, split->tiles_per_split);  // no split left without keys
  return cudaSuccess;
}

cudaError_t tree_attention(const TreeAttentionProblem& p, const TreeAttentionSplit& split, float* partial_out,
                           float* partial_lse, cudaStream_t stream) {
  const int64_t row_tiles = ceil_div(int64_t(p.num_q_heads / p.num_kv_heads) * p.num_new, kTileM);
  const int64_t rows = int64_t(p.batch) * p.num_q_heads * p.num_new;
  if (int64_t(p.batch) * p.num_kv_heads > INT_MAX || row_tiles > 65535 || split.num_splits > 65535 ||
      rows > INT_MAX) {
    return cudaErrorInvalidConfiguration;  // beyond the grid limits
  }
  switch (p.dtype) {
    case AttentionDtype::kFloat16: return launch_for_head_dim<__half>(p, split, partial_out, partial_lse, stream);
    case AttentionDtype::kBFloat16:
      return launch_for_head_dim<__nv_bfloat16>(p, split, partial_out, partial_lse, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msd::cuda
