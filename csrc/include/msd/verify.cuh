// CUDA kernels of tree verification (semantics: msd_kernels/reference.py): verify_greedy
// (argmax_kernel, then greedy_walk_kernel) and verify_sampling (verify_sampling_kernel, then
// advance_rng_offset_kernel). Launchers: csrc/cuda/verify.cu. Framework-free.
#pragma once

#include <cstdint>

#include "msd/cuda_common.cuh"
#include "msd/launch_types.h"
#include "msd/philox.h"

namespace msd::cuda {

inline constexpr int kArgmaxThreads = 512;
inline constexpr int kWalkThreads = 128;
inline constexpr int kSamplingThreads = 512;

// Child links of one tree (a batch row of first_child / next_sibling). A link outside
// [0, size) ends the list, so bad input cannot make a walk read out of bounds.
struct TreeLinks {
  const int64_t* first_child;   // [size] int64
  const int64_t* next_sibling;  // [size] int64
  int64_t size;

  __device__ int64_t checked(int64_t node) const { return node >= 0 && node < size ? node : -1; }
  __device__ int64_t first(int64_t node) const { return checked(first_child[node]); }
  __device__ int64_t next(int64_t child) const { return checked(next_sibling[child]); }
};

// The first child of `node`, in sibling order, for which accept(child) holds, or -1. accept
// is called on the children in order until it holds. At most `size` children are visited,
// so cyclic links (bad input) cannot hang the kernel.
template <typename Accept>
__device__ int64_t first_accepted_child(const TreeLinks& links, int64_t node, Accept accept) {
  int64_t child = links.first(node);
  for (int64_t visited = 0; child != -1 && visited < links.size; ++visited, child = links.next(child)) {
    if (accept(child)) return child;
  }
  return -1;
}

// From the root, moves to choose(node) while that is a child (-1: stop). Writes the path to
// `path` ([size], root first, -1 padded) and its length - 1 to `*num_accepted`; returns the
// last node. choose is called on every node of the path, the last one included.
template <typename Choose>
__device__ int64_t walk_path(int64_t size, Choose choose, int64_t* path, int64_t* num_accepted) {
  int64_t node = 0;
  int64_t length = 1;
  path[0] = 0;
  for (;;) {
    const int64_t child = choose(node);
    if (child == -1 || length == size) break;  // a full path can only continue on bad links
    node = child;
    path[length++] = node;
  }
  for (int64_t j = length; j < size; ++j) path[j] = -1;
  *num_accepted = length - 1;
  return node;
}

// verify_greedy, part 1. One block per tree row, blockIdx.x = b * (T+1) + node: the target's
// argmax over the vocabulary (ties to the lowest token id).
template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(
    const T* __restrict__ logits,  // [B, T+1, V]
    int64_t* __restrict__ argmax,  // [B, T+1] int64, out
    int64_t vocab) {               // V >= 1
  __shared__ uint64_t scratch[kMaxWarps];
  const T* row = logits + blockIdx.x * vocab;
  uint64_t best = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) best = MaxOp{}(best, pack_rank(to_float(row[v]), v));
  best = block_reduce(best, MaxOp{}, scratch);
  if (threadIdx.x == 0) argmax[blockIdx.x] = rank_index(best);
}

// verify_greedy, part 2. One thread per batch row: from the root, move to the first child
// whose token is the argmax at the current node; the bonus token is the argmax at the end.
static __global__ void __launch_bounds__(kWalkThreads) greedy_walk_kernel(
    const int64_t* __restrict__ argmax,          // [B, T+1] int64
    const int64_t* __restrict__ tree_tokens,     // [B, T+1] int64
    const int64_t* __restrict__ first_child,     // [B, T+1] int64
    const int64_t* __restrict__ next_sibling,    // [B, T+1] int64
    int64_t* __restrict__ accepted_index,        // [B, T+1] int64, out
    int64_t* __restrict__ num_accepted,          // [B] int64, out
    int64_t* __restrict__ bonus_token,           // [B] int64, out
    int64_t batch, int64_t size) {               // size = T + 1
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int64_t row = b * size;
  const TreeLinks links{first_child + row, next_sibling + row, size};
  const auto choose = [&](int64_t node) {
    return first_accepted_child(links, node, [&](int64_t child) { return tree_tokens[row + child] == argmax[row + node]; });
  };
  const int64_t last = walk_path(size, choose, accepted_index + row, num_accepted + b);
  bonus_token[b] = argmax[row + last];
}

__device__ inline bool contains(const int64_t* list, int count, int64_t value) {
  for (int i = 0; i < count; ++i) {
    if (list[i] == value) return true;
  }
  return false;
}

// verify_sampling. One block per batch row. Thread 0 walks the tree with the sibling-by-
// sibling rule (float32, as the reference); then the block draws the bonus token from the
// residual of the last node: the first token whose float64 running sum of p (rejected tokens
// as 0) exceeds u * mass, else the last token with p > 0 left, else argmax p. Each thread
// sums a contiguous segment, so one block scan of the segment sums gives every running sum.
// Tree tokens outside [0, V) (bad input) count as p = 0.
static __global__ void __launch_bounds__(kSamplingThreads) verify_sampling_kernel(
    const float* __restrict__ probs,            // [B, T+1, V] float32
    const int64_t* __restrict__ tree_tokens,    // [B, T+1] int64
    const int64_t* __restrict__ first_child,    // [B, T+1] int64
    const int64_t* __restrict__ next_sibling,   // [B, T+1] int64
    const int64_t* __restrict__ rng_state,      // [2] int64 (seed, offset), read only here
    int64_t* __restrict__ accepted_index,       // [B, T+1] int64, out
    int64_t* __restrict__ num_accepted,         // [B] int64, out
    int64_t* __restrict__ bonus_token,          // [B] int64, out
    int64_t size,                               // T + 1 <= kMaxTreeTokens
    int64_t vocab) {                            // V >= 1
  __shared__ int64_t rejected[kMaxTreeTokens];  // tokens rejected at the last node
  __shared__ int rejected_count;
  __shared__ int64_t last_node;
  __shared__ double threshold;  // float64(u * mass), u the row's last draw
  __shared__ double sum_scratch[kMaxWarps];
  __shared__ int64_t index_scratch[kMaxWarps];
  __shared__ uint64_t rank_scratch[kMaxWarps];
  const int64_t b = blockIdx.x;
  const int64_t row = b * size;

  if (threadIdx.x == 0) {
    const uint64_t seed = static_cast<uint64_t>(rng_state[0]);
    const uint64_t offset = static_cast<uint64_t>(rng_state[1]);
    const TreeLinks links{first_child + row, next_sibling + row, size};
    uint32_t draw = 0;  // draws of this row so far
    const float* p = nullptr;
    float mass = 1.0f;
    int count = 0;
    // __fmul_rn / __fsub_rn: exactly the reference's float32 operations, never contracted.
    const auto sibling_rule = [&](int64_t child) {
      const int64_t token = tree_tokens[row + child];
      const bool in_vocab = token >= 0 && token < vocab;
      const float p_token = in_vocab && !contains(rejected, count, token) ? p[token] : 0.0f;
      const float u = philox_uniform(seed, offset, static_cast<uint32_t>(b), draw++);
      if (__fmul_rn(u, mass) < p_token) return true;
      mass = __fsub_rn(mass, p_token);
      if (in_vocab) rejected[count++] = token;  // at most one per visited child: <= size
      return false;
    };
    const auto choose = [&](int64_t node) {
      p = probs + (row + node) * vocab;
      mass = 1.0f;
      count = 0;
      return first_accepted_child(links, node, sibling_rule);
    };
    last_node = walk_path(size, choose, accepted_index + row, num_accepted + b);
    rejected_count = count;
    threshold = static_cast<double>(__fmul_rn(philox_uniform(seed, offset, static_cast<uint32_t>(b), draw), mass));
  }
  __syncthreads();

  const float* p = probs + (row + last_node) * vocab;
  const int count = rejected_count;
  const auto residual = [&](int64_t v) { return contains(rejected, count, v) ? 0.0 : static_cast<double>(p[v]); };
  const int64_t per_thread = (vocab + blockDim.x - 1) / blockDim.x;
  const int64_t begin = MinOp{}(vocab, threadIdx.x * per_thread);
  const int64_t end = MinOp{}(vocab, begin + per_thread);
  double segment = 0.0;
  int64_t last_positive = -1;
  uint64_t best = 0;
  for (int64_t v = begin; v < end; ++v) {
    const double r = residual(v);
    segment += r;
    if (r > 0.0) last_positive = v;
    best = MaxOp{}(best, pack_rank(p[v], v));
  }
  double total;
  double running = block_exclusive_scan(segment, sum_scratch, &total);
  int64_t first_above = vocab;  // none
  for (int64_t v = begin; v < end; ++v) {
    running += residual(v);
    if (running > threshold) {
      first_above = v;
      break;
    }
  }
  first_above = block_reduce(first_above, MinOp{}, index_scratch);
  last_positive = block_reduce(last_positive, MaxOp{}, index_scratch);
  best = block_reduce(best, MaxOp{}, rank_scratch);
  if (threadIdx.x == 0) {
    bonus_token[b] = first_above < vocab ? first_above : (last_positive >= 0 ? last_positive : rank_index(best));
  }
}

// After verify_sampling_kernel on the same stream: every row has read the offset by then.
static __global__ void advance_rng_offset_kernel(int64_t* rng_state) {  // [2] int64 (seed, offset)
  rng_state[1] += 1;
}

}  // namespace msd::cuda
