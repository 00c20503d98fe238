// Host entry points of the CUDA tree_attention (csrc/cuda/tree_attention.cu), callable from
// plain C++: no torch and no CUDA device headers. Semantics: msd_kernels/reference.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace msd::cuda {

enum class AttentionDtype { kFloat16, kBFloat16 };

// One call. Element strides are for dims 0..2; the last dim of q/k/v must be contiguous,
// every stride a multiple of 8 and every pointer 16-byte aligned (16-byte loads).
struct TreeAttentionProblem {
  AttentionDtype dtype;      // of q, k_cache, v_cache and out
  int batch;                 // B
  int num_q_heads;           // Hq
  int num_kv_heads;          // Hkv, divides Hq
  int num_new;               // Q >= 1
  int tree_len;              // tree rows after the prefix, Q <= tree_len <= S_max; the queries last
  int head_dim;              // D: 64, 80, 96 or 128
  int max_len;               // S_max >= tree_len
  const void* q;             // [B, Hq, Q, D]
  int64_t q_strides[3];
  const void* k_cache;       // [B, Hkv, S_max, D]
  int64_t k_strides[3];
  const void* v_cache;       // [B, Hkv, S_max, D]
  int64_t v_strides[3];
  const int32_t* prefix_len; // [B] int32, on the device
  const int64_t* tree_mask;  // [B, Q, ceil(tree_len/64)] int64 contiguous, or nullptr: causal chunk
  float scale;               // softmax scale
  void* out;                 // [B, Hq, Q, D] contiguous
};

// How the key axis is split across blocks. Depends on the sizes and the device's SM count,
// never on prefix_len values, so the launch is CUDA-graph safe.
struct TreeAttentionSplit {
  int num_splits;       // chunks of the key axis 0 .. S_max
  int tiles_per_split;  // 64-key tiles per chunk
};

// The split for `problem` on the current device.
cudaError_t tree_attention_split(const TreeAttentionProblem& problem, TreeAttentionSplit* split);

// Launches the split and merge kernels on `stream`. Workspace (float32, uninitialised):
// partial_out [num_splits, B * Hq * Q, D], partial_lse [num_splits, B * Hq * Q].
// Returns the first launch error; cudaErrorInvalidValue for an unsupported head_dim.
cudaError_t tree_attention(const TreeAttentionProblem& problem, const TreeAttentionSplit& split,
                           float* partial_out, float* partial_lse, cudaStream_t stream);

}  // namespace msd::cuda
