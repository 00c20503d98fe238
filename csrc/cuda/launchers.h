// Host entry points of the msd CUDA kernels (tree_build.cu, kv_compact.cu, verify.cu),
// callable from plain C++ such as the torch glue (ops_cuda.cpp). Semantics and shapes:
// msd_kernels/reference.py. Every pointer is a contiguous device buffer of the stated shape;
// every function only enqueues kernels on `stream` (no host sync) and returns the launch
// status: cudaErrorInvalidValue when a size breaks a stated precondition. Index *values*
// are not checked on the host (that would need a sync); the kernels stay in bounds anyway.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "msd/launch_types.h"

namespace msd::cuda {

// One depth step: log-softmax + top_k children of each frontier node into pool slots
// pool_offset .. pool_offset + n * top_k, then the next frontier. Two launches.
// Needs 1 <= top_k <= min(V, kMaxTopK), n >= 1, pool_offset + n * top_k <= P.
cudaError_t tree_expand(const void* logits,                  // [B, n, V] of logits_type
                        FloatType logits_type,
                        const float* frontier_scores,        // [B, n]
                        const int64_t* frontier_pool_index,  // [B, n]
                        int64_t* pool_tokens,                // [B, P], written in place
                        float* pool_scores,                  // [B, P], written in place
                        int64_t* pool_parents,               // [B, P], written in place
                        int64_t* next_tokens,                // [B, top_k], out
                        float* next_scores,                  // [B, top_k], out
                        int64_t* next_pool_index,            // [B, top_k], out
                        int64_t batch, int64_t num_frontier, int64_t vocab, int64_t pool_size,
                        int64_t pool_offset, int64_t top_k, cudaStream_t stream);

// The tree of the T best pool candidates. One launch. Needs P <= kMaxPoolSize and
// 1 <= T <= min(P, kMaxTreeTokens - 1).
cudaError_t tree_assemble(const int64_t* pool_tokens,   // [B, P]
                          const float* pool_scores,     // [B, P]
                          const int64_t* pool_parents,  // [B, P]
                          const int64_t* root_token,    // [B]
                          int64_t* tokens,              // [B, T+1], out
                          int64_t* depth,               // [B, T+1], out
                          int64_t* parent,              // [B, T+1], out
                          int64_t* mask,                // [B, T+1, ceil((T+1)/64)], out
                          int64_t* first_child,         // [B, T+1], out
                          int64_t* next_sibling,        // [B, T+1], out
                          int64_t batch, int64_t pool_size, int64_t num_nodes, cudaStream_t stream);

// Moves the accepted rows of every plane and head next to the prefix, then advances
// prefix_len. Two launches. Needs 1 <= A <= kMaxTreeTokens; any element type (rows are
// copied as bytes). Sequences with out-of-range indices are left untouched.
cudaError_t kv_compact(void* kv_cache,                 // [N, B, H, S, D], row_bytes per row
                       const int64_t* accepted_index,  // [B, A]
                       const int64_t* num_accepted,    // [B]
                       int32_t* prefix_len,            // [B], advanced in place
                       int64_t planes, int64_t batch, int64_t heads, int64_t max_len,
                       int64_t row_bytes, int64_t width, cudaStream_t stream);

// Greedy verification. Two launches. Needs 1 <= T+1 and V >= 1.
cudaError_t verify_greedy(const void* logits,           // [B, T+1, V] of logits_type
                          FloatType logits_type,
                          const int64_t* tree_tokens,   // [B, T+1]
                          const int64_t* first_child,   // [B, T+1]
                          const int64_t* next_sibling,  // [B, T+1]
                          int64_t* argmax,              // [B, T+1], scratch
                          int64_t* accepted_index,      // [B, T+1], out
                          int64_t* num_accepted,        // [B], out
                          int64_t* bonus_token,         // [B], out
                          int64_t batch, int64_t size, int64_t vocab, cudaStream_t stream);

// Sampling verification with Philox (seed, offset) = rng_state, whose offset is then
// incremented on the device. Two launches. Needs 1 <= T+1 <= kMaxTreeTokens and V >= 1.
cudaError_t verify_sampling(const float* probs,            // [B, T+1, V]
                            const int64_t* tree_tokens,    // [B, T+1]
                            const int64_t* first_child,    // [B, T+1]
                            const int64_t* next_sibling,   // [B, T+1]
                            int64_t* rng_state,            // [2], offset advanced in place
                            int64_t* accepted_index,       // [B, T+1], out
                            int64_t* num_accepted,         // [B], out
                            int64_t* bonus_token,          // [B], out
                            int64_t batch, int64_t size, int64_t vocab, cudaStream_t stream);

}  // namespace msd::cuda
