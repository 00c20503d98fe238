// Launchers of the tree verification kernels (msd/verify.cuh).
#include "cuda/launchers.h"
#include "msd/verify.cuh"

namespace msd::cuda {

cudaError_t verify_greedy(const void* logits, FloatType logits_type, const int64_t* tree_tokens,
                          const int64_t* first_child, const int64_t* next_sibling, int64_t* argmax,
                          int64_t* accepted_index, int64_t* num_accepted, int64_t* bonus_token, int64_t batch,
                          int64_t size, int64_t vocab, cudaStream_t stream) {
  if (size < 1 || vocab < 1 || vocab > kMaxRanked) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (batch * size > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const cudaError_t status = dispatch_float(logits_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    argmax_kernel<T><<<static_cast<unsigned>(batch * size), block_threads(vocab, kArgmaxThreads), 0, stream>>>(
        static_cast<const T*>(logits), argmax, vocab);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  const int64_t walk_blocks = (batch + kWalkThreads - 1) / kWalkThreads;
  greedy_walk_kernel<<<static_cast<unsigned>(walk_blocks), kWalkThreads, 0, stream>>>(
      argmax, tree_tokens, first_child, next_sibling, accepted_index, num_accepted, bonus_token, batch, size);
  return cudaGetLastError();
}

cudaError_t verify_sampling(const float* probs, const int64_t* tree_tokens, const int64_t* first_child,
                            const int64_t* next_sibling, int64_t* rng_state, int64_t* accepted_index,
                            int64_t* num_accepted, int64_t* bonus_token, int64_t batch, int64_t size,
                            int64_t vocab, cudaStream_t stream) {
  if (size < 1 || size > kMaxTreeTokens || vocab < 1 || vocab > kMaxRanked) return cudaErrorInvalidValue;
  if (batch > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  if (batch > 0) {
    verify_sampling_kernel<<<static_cast<unsigned>(batch), block_threads(vocab, kSamplingThreads), 0, stream>>>(
        probs, tree_tokens, first_child, next_sibling, rng_state, accepted_index, num_accepted, bonus_token, size,
        vocab);
    if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess) return status;
  }
  advance_rng_offset_kernel<<<1, 1, 0, stream>>>(rng_state);  // the reference advances even for B = 0
  return cudaGetLastError();
}

}  // namespace msd::cuda
