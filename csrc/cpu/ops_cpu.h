// CPU implementations of the msd ops (one file per op domain in this folder).
// Shapes and dtypes: msd_kernels/reference.py. Argument checks: TORCH_CHECK naming the
// argument; on CPU, index values are checked too (reading them costs no device sync).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace msd::cpu {

using Tensor = at::Tensor;

// tree_expand.cpp
std::tuple<Tensor, Tensor, Tensor> tree_expand(
    const Tensor& logits,               // [B, n, V] float32/float16/bfloat16
    const Tensor& frontier_scores,      // [B, n] float32
    const Tensor& frontier_pool_index,  // [B, n] int64, -1 = root
    const Tensor& pool_tokens,          // [B, P] int64, written
    const Tensor& pool_scores,          // [B, P] float32, written
    const Tensor& pool_parents,         // [B, P] int64, written
    int64_t pool_offset, int64_t top_k);

// tree_assemble.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> tree_assemble(
    const Tensor& pool_tokens,   // [B, P] int64
    const Tensor& pool_scores,   // [B, P] float32
    const Tensor& pool_parents,  // [B, P] int64
    const Tensor& root_token,    // [B] int64
    int64_t num_nodes);          // T

// tree_attention.cpp
Tensor tree_attention(
    const Tensor& q,                         // [B, Hq, Q, D]
    const Tensor& k_cache,                   // [B, Hkv, S_max, D]
    const Tensor& v_cache,                   // [B, Hkv, S_max, D]
    const Tensor& prefix_len,                // [B] int32
    const std::optional<Tensor>& tree_mask,  // [B, Q, ceil(tree_len/64)] int64 or None (causal)
    std::optional<double> scale,
    std::optional<int64_t> tree_len);        // tree rows, the queries last; None = Q

// kv_compact.cpp
void kv_compact(
    const Tensor& kv_cache,        // [N, B, H, S_max, D], edited in place
    const Tensor& accepted_index,  // [B, A] int64
    const Tensor& num_accepted,    // [B] int64
    const Tensor& prefix_len);     // [B] int32, advanced in place

// verify.cpp
std::tuple<Tensor, Tensor, Tensor> verify_greedy(
    const Tensor& logits,        // [B, T+1, V]
    const Tensor& tree_tokens,   // [B, T+1] int64
    const Tensor& first_child,   // [B, T+1] int64
    const Tensor& next_sibling); // [B, T+1] int64

std::tuple<Tensor, Tensor, Tensor> verify_sampling(
    const Tensor& probs,         // [B, T+1, V] float32
    const Tensor& tree_tokens,   // [B, T+1] int64
    const Tensor& first_child,   // [B, T+1] int64
    const Tensor& next_sibling,  // [B, T+1] int64
    const Tensor& rng_state);    // [2] int64 (seed, offset), offset += 1 in place

}  // namespace msd::cpu
