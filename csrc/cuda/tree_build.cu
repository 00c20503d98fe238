// Launchers of the draft-tree construction kernels (msd/tree_build.cuh).
#include "cuda/launchers.h"
#include "msd/tree_build.cuh"

namespace msd::cuda {

cudaError_t tree_expand(const void* logits, FloatType logits_type, const float* frontier_scores,
                        const int64_t* frontier_pool_index, int64_t* pool_tokens, float* pool_scores,
                        int64_t* pool_parents, int64_t* next_tokens, float* next_scores,
                        int64_t* next_pool_index, int64_t batch, int64_t num_frontier, int64_t vocab,
                        int64_t pool_size, int64_t pool_offset, int64_t top_k, cudaStream_t stream) {
  if (top_k < 1 || top_k > kMaxTopK || top_k > vocab || num_frontier < 1 || pool_offset < 0 ||
      pool_offset + num_frontier * top_k > pool_size || vocab > kMaxRanked) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  if (batch * num_frontier > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const cudaError_t status = dispatch_float(logits_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    expand_children_kernel<T><<<static_cast<unsigned>(batch * num_frontier), block_threads(vocab, kExpandThreads), 0, stream>>>(
        static_cast<const T*>(logits), frontier_scores, frontier_pool_index, pool_tokens, pool_scores,
        pool_parents, num_frontier, vocab, pool_size, pool_offset, static_cast<int>(top_k));
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  const int64_t num_candidates = num_frontier * top_k;
  select_frontier_kernel<<<static_cast<unsigned>(batch), block_threads(num_candidates, kFrontierThreads), 0, stream>>>(
      pool_tokens, pool_scores, next_tokens, next_scores, next_pool_index, num_candidates, pool_size,
      pool_offset, static_cast<int>(top_k));
  return cudaGetLastError();
}

cudaError_t tree_assemble(const int64_t* pool_tokens, const float* pool_scores, const int64_t* pool_parents,
                          const int64_t* root_token, int64_t* tokens, int64_t* depth, int64_t* parent,
                          int64_t* mask, int64_t* first_child, int64_t* next_sibling, int64_t batch,
                          int64_t pool_size, int64_t num_nodes, cudaStream_t stream) {
  if (pool_size > kMaxPoolSize || num_nodes < 1 || num_nodes > pool_size || num_nodes >= kMaxTreeTokens) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  if (batch > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  tree_assemble_kernel<<<static_cast<unsigned>(batch), block_threads(pool_size, kAssembleThreads), 0, stream>>>(
      pool_tokens, pool_scores, pool_parents, root_token, tokens, depth, parent, mask, first_child, next_sibling,
      static_cast<int>(pool_size), static_cast<int>(num_nodes));
  return cudaGetLastError();
}

}  // namespace msd::cuda
