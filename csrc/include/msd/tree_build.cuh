// CUDA kernels of the draft-tree construction ops (semantics: msd_kernels/reference.py):
// tree_expand (expand_children_kernel, then select_frontier_kernel) and tree_assemble
// (tree_assemble_kernel). Launchers: csrc/cuda/tree_build.cu. Framework-free.
#pragma once

#include <cstdint>

#include "msd/common.h"
#include "msd/cuda_common.cuh"
#include "msd/launch_types.h"

namespace msd::cuda {

inline constexpr int kExpandThreads = 1024;   // most threads of a per-node softmax + top-k block
inline constexpr int kFrontierThreads = 256;  // most threads of a per-row frontier selection
inline constexpr int kAssembleThreads = 1024;

// Shared memory of block_topk.
struct TopKShared {
  uint64_t warp_best[kMaxWarps][kMaxTopK];  // each warp's best ranks, best first
  int warp_count[kMaxWarps];                // valid entries of warp_best[w]
  uint64_t best[kMaxTopK];                  // the block's best ranks, best first
};

// Merges the lanes' rank lists (each sorted best first, `count` entries; lanes without a
// list pass count 0) into the warp's best `k`, stored by lane 0 in `out`. Returns how many
// were stored, in every lane. Call from all 32 lanes.
__device__ inline int warp_merge_topk(const uint64_t* list, int count, int k, uint64_t* out) {
  int head = 0;
  for (int r = 0; r < k; ++r) {
    const uint64_t mine = head < count ? list[head] : 0;
    const uint64_t best = warp_reduce(mine, MaxOp{});
    if (best == 0) return r;   // every list is exhausted (same answer in all lanes)
    if (mine == best) ++head;  // ranks are unique: exactly one lane owns the winner
    if (threadIdx.x % kWarpSize == 0) out[r] = best;
  }
  return k;
}

// The best `k` (<= kMaxTopK) of `count` >= k candidates into shared.best, best first;
// rank_of(j) is candidate j's pack_rank (unique per j). Each thread keeps the sorted best k
// of its own candidates j = tid, tid + blockDim, ... (the block's best k are among them), the
// warps merge their lanes' lists, then warp 0 merges the warps' lists. Call from all threads.
template <typename RankOf>
__device__ void block_topk(RankOf rank_of, int64_t count, int k, TopKShared& shared) {
  uint64_t list[kMaxTopK];  // this thread's best so far, best first
  int size = 0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const uint64_t rank = rank_of(j);
    if (size == k && rank < list[k - 1]) continue;
    int pos = size < k ? size++ : k - 1;  // the slot freed for it, then shift it up
    for (; pos > 0 && list[pos - 1] < rank; --pos) list[pos] = list[pos - 1];
    list[pos] = rank;
  }
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int merged = warp_merge_topk(list, size, k, shared.warp_best[warp]);
  if (lane == 0) shared.warp_count[warp] = merged;
  __syncthreads();
  if (warp == 0) {
    const bool has_list = lane < num_warps();
    warp_merge_topk(has_list ? shared.warp_best[lane] : nullptr, has_list ? shared.warp_count[lane] : 0, k,
                    shared.best);
  }
  __syncthreads();
}

// tree_expand, part 1. One block per (batch row b, frontier node i), blockIdx.x = b * n + i:
// float32 log-softmax of the node's logits, its top_k children (ties to the lower token id)
// and their cumulative scores, written to pool slots pool_offset + i * top_k + c.
template <typename T>
__global__ void __launch_bounds__(kExpandThreads) expand_children_kernel(
    const T* __restrict__ logits,                     // [B, n, V]
    const float* __restrict__ frontier_scores,        // [B, n]
    const int64_t* __restrict__ frontier_pool_index,  // [B, n], -1 = root
    int64_t* __restrict__ pool_tokens,                // [B, P] int64, slots written as above
    float* __restrict__ pool_scores,                  // [B, P] float32
    int64_t* __restrict__ pool_parents,               // [B, P] int64
    int64_t num_frontier,                             // n >= 1
    int64_t vocab,                                    // V >= top_k
    int64_t pool_size,                                // P >= pool_offset + n * top_k
    int64_t pool_offset, int top_k) {
  __shared__ float scratch[kMaxWarps];
  __shared__ TopKShared topk;
  const int64_t node = blockIdx.x;
  const int64_t b = node / num_frontier;
  const int64_t i = node % num_frontier;
  const T* row = logits + node * vocab;

  float max_logit = -INFINITY;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) max_logit = fmaxf(max_logit, to_float(row[v]));
  max_logit = block_reduce(max_logit, MaxOp{}, scratch);
  float sum_exp = 0.0f;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) sum_exp += expf(to_float(row[v]) - max_logit);
  const float log_sum = logf(block_reduce(sum_exp, SumOp{}, scratch));
  // As torch's float32 log_softmax: (x - max) - log(sum(exp(x - max))). Ranking these values
  // rather than the logits keeps the reference's ties where rounding merges two logits.
  const auto log_prob = [&](int64_t v) { return (to_float(row[v]) - max_logit) - log_sum; };
  block_topk([&](int64_t v) { return pack_rank(log_prob(v), v); }, vocab, top_k, topk);

  for (int c = threadIdx.x; c < top_k; c += blockDim.x) {
    const int64_t token = rank_index(topk.best[c]);
    const int64_t slot = b * pool_size + pool_offset + i * top_k + c;
    pool_tokens[slot] = token;
    pool_scores[slot] = frontier_scores[node] + log_prob(token);
    pool_parents[slot] = frontier_pool_index[node];
  }
}

// tree_expand, part 2 (after part 1 on the same stream). One block per batch row: the next
// frontier, the top_k of the row's n * top_k new pool slots by cumulative score (ties to the
// lower slot), best first.
static __global__ void __launch_bounds__(kFrontierThreads) select_frontier_kernel(
    const int64_t* __restrict__ pool_tokens,    // [B, P] int64
    const float* __restrict__ pool_scores,      // [B, P] float32
    int64_t* __restrict__ frontier_tokens,      // [B, top_k] int64, out
    float* __restrict__ frontier_scores,        // [B, top_k] float32, out
    int64_t* __restrict__ frontier_pool_index,  // [B, top_k] int64, out
    int64_t num_candidates,                     // n * top_k >= top_k
    int64_t pool_size, int64_t pool_offset, int top_k) {
  __shared__ TopKShared topk;
  const int64_t b = blockIdx.x;
  const int64_t first = b * pool_size + pool_offset;
  block_topk([&](int64_t j) { return pack_rank(pool_scores[first + j], j); }, num_candidates, top_k, topk);
  for (int r = threadIdx.x; r < top_k; r += blockDim.x) {
    const int64_t j = rank_index(topk.best[r]);
    frontier_tokens[b * top_k + r] = pool_tokens[first + j];
    frontier_scores[b * top_k + r] = pool_scores[first + j];
    frontier_pool_index[b * top_k + r] = pool_offset + j;
  }
}

// The rank of the T-th best of `pool_size` >= T candidates: the largest t with at least T
// ranks >= t, found bit by bit from the top (ranks are unique, so exactly T are >= it).
__device__ inline uint64_t tth_best_rank(const float* scores, int pool_size, int num_nodes, int64_t* scratch) {
  uint64_t threshold = 0;
  for (int bit = 63; bit >= 0; --bit) {
    const uint64_t trial = threshold | (uint64_t{1} << bit);
    int64_t count = 0;
    for (int j = threadIdx.x; j < pool_size; j += blockDim.x) count += pack_rank(scores[j], j) >= trial;
    if (block_reduce(count, SumOp{}, scratch) >= num_nodes) threshold = trial;
  }
  return threshold;
}

// First tree index in [from, size) whose parent is `p`, or -1.
__device__ inline int first_with_parent(const int* parent, int from, int size, int p) {
  for (int c = from; c < size; ++c) {
    if (parent[c] == p) return c;
  }
  return -1;
}

// tree_assemble. One block per batch row: keep the T best pool candidates (ties to the lower
// pool index) ordered by pool index as tree nodes 1..T after the root, and write the tree.
// A kept node whose parent is not an earlier kept node (invalid input, which the reference
// rejects) is attached to the root, so the output is always a well-formed tree.
static __global__ void __launch_bounds__(kAssembleThreads) tree_assemble_kernel(
    const int64_t* __restrict__ pool_tokens,   // [B, P] int64
    const float* __restrict__ pool_scores,     // [B, P] float32
    const int64_t* __restrict__ pool_parents,  // [B, P] int64 pool index or -1 (root)
    const int64_t* __restrict__ root_token,    // [B] int64
    int64_t* __restrict__ tokens,              // [B, T+1] int64, out
    int64_t* __restrict__ depth,               // [B, T+1] int64, out
    int64_t* __restrict__ parent,              // [B, T+1] int64, out (-1 for the root)
    int64_t* __restrict__ mask,                // [B, T+1, W] int64 packed ancestors, out
    int64_t* __restrict__ first_child,         // [B, T+1] int64, out (-1: none)
    int64_t* __restrict__ next_sibling,        // [B, T+1] int64, out (-1: none)
    int pool_size,                             // P <= kMaxPoolSize
    int num_nodes) {                           // T, 1 <= T <= min(P, kMaxTreeTokens - 1)
  __shared__ int64_t scratch[kMaxWarps];
  __shared__ int kept[kMaxTreeTokens - 1];  // pool index of tree node i + 1, ascending
  __shared__ int tree_parent[kMaxTreeTokens];
  const int64_t b = blockIdx.x;
  const int size = num_nodes + 1;
  const int words = static_cast<int>(mask_words(size));
  const float* scores = pool_scores + b * pool_size;

  // Kept set, compacted in pool order with a block-wide scan per blockDim chunk.
  const uint64_t threshold = tth_best_rank(scores, pool_size, num_nodes, scratch);
  int64_t kept_before = 0;
  for (int base = 0; base < pool_size; base += blockDim.x) {
    const int j = base + threadIdx.x;
    const int64_t keep = j < pool_size && pack_rank(scores[j], j) >= threshold;
    int64_t chunk_total;
    const int64_t slot = kept_before + block_exclusive_scan(keep, scratch, &chunk_total);
    if (keep && slot < num_nodes) kept[slot] = j;
    kept_before += chunk_total;
  }
  __syncthreads();

  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    int p = -1;
    if (i > 0) {
      const int64_t pool_parent = pool_parents[b * pool_size + kept[i - 1]];
      int lo = 0, hi = num_nodes;  // binary search: first kept entry >= pool_parent
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (kept[mid] < pool_parent) lo = mid + 1; else hi = mid;
      }
      p = (pool_parent != -1 && lo < i - 1 && kept[lo] == pool_parent) ? lo + 1 : 0;
    }
    tree_parent[i] = p;
    tokens[b * size + i] = i == 0 ? root_token[b] : pool_tokens[b * pool_size + kept[i - 1]];
    parent[b * size + i] = p;
  }
  __syncthreads();

  // Parents precede children, so every walk up tree_parent strictly decreases and ends at -1.
  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    int64_t d = 0;
    for (int p = tree_parent[i]; p != -1; p = tree_parent[p]) ++d;
    depth[b * size + i] = d;
    first_child[b * size + i] = first_with_parent(tree_parent, i + 1, size, i);
    next_sibling[b * size + i] = i == 0 ? -1 : first_with_parent(tree_parent, i + 1, size, tree_parent[i]);
  }
  // Word w of row i: the ancestors-or-self of i in [64 w, 64 w + 64); the walk stops below it.
  for (int e = threadIdx.x; e < size * words; e += blockDim.x) {
    const int i = e / words;
    const int w = e % words;
    uint64_t word = 0;
    for (int p = i; p >= 64 * w; p = tree_parent[p]) {
      if (p < 64 * (w + 1)) word |= uint64_t{1} << (p % 64);
    }
    mask[b * size * words + e] = static_cast<int64_t>(word);
  }
}

}  // namespace msd::cuda
