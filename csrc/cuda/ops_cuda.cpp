// Torch glue of the CUDA tree-building, KV-compaction and verification ops: argument
// checks, device guard, current stream, output allocation and launch status. The kernels
// are in csrc/include/msd/*.cuh, their launchers in launchers.h. Only structural checks
// happen here (device, dtype, shape, contiguity): checking index values would need a host
// sync, so the kernels keep every memory access in bounds on bad values instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/launchers.h"

namespace {

using at::Tensor;
using msd::kMaxPoolSize;
using msd::kMaxTopK;
using msd::kMaxTreeTokens;
using msd::FloatType;

// Argument `name` of op `op` is on `device`, with `dtype` and exactly `shape`.
void check_tensor(const char* op, const char* name, const Tensor& tensor, const c10::Device& device,
                  at::ScalarType dtype, c10::IntArrayRef shape) {
  TORCH_CHECK(tensor.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", tensor.sizes());
}

// The first tensor argument: a CUDA tensor of `ndim` dimensions, whose device the others share.
void check_leading(const char* op, const char* name, const Tensor& tensor, int64_t ndim) {
  TORCH_CHECK(tensor.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", tensor.device());
  TORCH_CHECK(tensor.dim() == ndim, op, ": ", name, " must have ", ndim, " dimensions, got shape ",
              tensor.sizes());
}

// Arguments written in place must be contiguous: the kernels index them as dense arrays.
void check_contiguous(const char* op, const char* name, const Tensor& tensor) {
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous (it is written in place)");
}

FloatType float_type(const char* op, const char* name, const Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must have dtype float32, float16 or bfloat16, got ",
                  tensor.scalar_type());
  }
}

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

Tensor new_empty(const Tensor& like, c10::IntArrayRef shape, at::ScalarType dtype) {
  return at::empty(shape, like.options().dtype(dtype));
}

std::tuple<Tensor, Tensor, Tensor> tree_expand(const Tensor& logits, const Tensor& frontier_scores,
                                               const Tensor& frontier_pool_index, const Tensor& pool_tokens,
                                               const Tensor& pool_scores, const Tensor& pool_parents,
                                               int64_t pool_offset, int64_t top_k) {
  constexpr const char* op = "tree_expand";
  check_leading(op, "logits", logits, 3);
  const FloatType logits_type = float_type(op, "logits", logits);
  const int64_t batch = logits.size(0), num_frontier = logits.size(1), vocab = logits.size(2);
  const c10::Device device = logits.device();
  check_tensor(op, "frontier_scores", frontier_scores, device, at::kFloat, {batch, num_frontier});
  check_tensor(op, "frontier_pool_index", frontier_pool_index, device, at::kLong, {batch, num_frontier});
  TORCH_CHECK(pool_tokens.dim() == 2, op, ": pool_tokens must have 2 dimensions, got shape ", pool_tokens.sizes());
  const int64_t pool_size = pool_tokens.size(1);
  check_tensor(op, "pool_tokens", pool_tokens, device, at::kLong, {batch, pool_size});
  check_tensor(op, "pool_scores", pool_scores, device, at::kFloat, {batch, pool_size});
  check_tensor(op, "pool_parents", pool_parents, device, at::kLong, {batch, pool_size});
  check_contiguous(op, "pool_tokens", pool_tokens);
  check_contiguous(op, "pool_scores", pool_scores);
  check_contiguous(op, "pool_parents", pool_parents);
  TORCH_CHECK(num_frontier >= 1, op, ": logits must hold at least one frontier node, got shape ", logits.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= kMaxTopK && top_k <= vocab, op, ": top_k must be in [1, min(V, ", kMaxTopK,
              ")] with V = ", vocab, ", got ", top_k);
  TORCH_CHECK(pool_offset >= 0 && pool_offset + num_frontier * top_k <= pool_size, op,
              ": pool_offset must be in [0, P - n * top_k] = [0, ", pool_size - num_frontier * top_k, "], got ",
              pool_offset);

  const c10::cuda::CUDAGuard guard(device);
  const Tensor logits_c = logits.contiguous();
  const Tensor scores_c = frontier_scores.contiguous();
  const Tensor index_c = frontier_pool_index.contiguous();
  Tensor next_tokens = new_empty(logits, {batch, top_k}, at::kLong);
  Tensor next_scores = new_empty(logits, {batch, top_k}, at::kFloat);
  Tensor next_pool_index = new_empty(logits, {batch, top_k}, at::kLong);
  check_launch(op, msd::cuda::tree_expand(
                       logits_c.const_data_ptr(), logits_type, scores_c.const_data_ptr<float>(),
                       index_c.const_data_ptr<int64_t>(), pool_tokens.mutable_data_ptr<int64_t>(),
                       pool_scores.mutable_data_ptr<float>(), pool_parents.mutable_data_ptr<int64_t>(),
                       next_tokens.mutable_data_ptr<int64_t>(), next_scores.mutable_data_ptr<float>(),
                       next_pool_index.mutable_data_ptr<int64_t>(), batch, num_frontier, vocab, pool_size,
                       pool_offset, top_k, c10::cuda::getCurrentCUDAStream()));
  return {next_tokens, next_scores, next_pool_index};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> tree_assemble(const Tensor& pool_tokens,
                                                                         const Tensor& pool_scores,
                                                                         const Tensor& pool_parents,
                                                                         const Tensor& root_token,
                                                                         int64_t num_nodes) {
  constexpr const char* op = "tree_assemble";
  check_leading(op, "pool_tokens", pool_tokens, 2);
  const int64_t batch = pool_tokens.size(0), pool_size = pool_tokens.size(1);
  const c10::Device device = pool_tokens.device();
  check_tensor(op, "pool_tokens", pool_tokens, device, at::kLong, {batch, pool_size});
  check_tensor(op, "pool_scores", pool_scores, device, at::kFloat, {batch, pool_size});
  check_tensor(op, "pool_parents", pool_parents, device, at::kLong, {batch, pool_size});
  check_tensor(op, "root_token", root_token, device, at::kLong, {batch});
  TORCH_CHECK(pool_size <= kMaxPoolSize, op, ": pool_tokens: pool size ", pool_size, " exceeds the maximum ",
              kMaxPoolSize);
  TORCH_CHECK(num_nodes >= 1 && num_nodes <= pool_size && num_nodes < kMaxTreeTokens, op,
              ": num_nodes must be in [1, min(P, ", kMaxTreeTokens - 1, ")] with P = ", pool_size, ", got ",
              num_nodes);

  const c10::cuda::CUDAGuard guard(device);
  const Tensor tokens_c = pool_tokens.contiguous();
  const Tensor scores_c = pool_scores.contiguous();
  const Tensor parents_c = pool_parents.contiguous();
  const Tensor root_c = root_token.contiguous();
  const int64_t size = num_nodes + 1;
  const int64_t words = (size + 63) / 64;
  Tensor tokens = new_empty(pool_tokens, {batch, size}, at::kLong);
  Tensor depth = new_empty(pool_tokens, {batch, size}, at::kLong);
  Tensor parent = new_empty(pool_tokens, {batch, size}, at::kLong);
  Tensor mask = new_empty(pool_tokens, {batch, size, words}, at::kLong);
  Tensor first_child = new_empty(pool_tokens, {batch, size}, at::kLong);
  Tensor next_sibling = new_empty(pool_tokens, {batch, size}, at::kLong);
  check_launch(op, msd::cuda::tree_assemble(
                       tokens_c.const_data_ptr<int64_t>(), scores_c.const_data_ptr<float>(),
                       parents_c.const_data_ptr<int64_t>(), root_c.const_data_ptr<int64_t>(),
                       tokens.mutable_data_ptr<int64_t>(), depth.mutable_data_ptr<int64_t>(),
                       parent.mutable_data_ptr<int64_t>(), mask.mutable_data_ptr<int64_t>(),
                       first_child.mutable_data_ptr<int64_t>(), next_sibling.mutable_data_ptr<int64_t>(), batch,
                       pool_size, num_nodes, c10::cuda::getCurrentCUDAStream()));
  return {tokens, depth, parent, mask, first_child, next_sibling};
}

void kv_compact(const Tensor& kv_cache, const Tensor& accepted_index, const Tensor& num_accepted,
                const Tensor& prefix_len) {
  constexpr const char* op = "kv_compact";
  check_leading(op, "kv_cache", kv_cache, 5);
  check_contiguous(op, "kv_cache", kv_cache);
  const int64_t batch = kv_cache.size(1);
  const c10::Device device = kv_cache.device();
  TORCH_CHECK(accepted_index.dim() == 2, op, ": accepted_index must have 2 dimensions, got shape ",
              accepted_index.sizes());
  const int64_t width = accepted_index.size(1);
  check_tensor(op, "accepted_index", accepted_index, device, at::kLong, {batch, width});
  check_tensor(op, "num_accepted", num_accepted, device, at::kLong, {batch});
  check_tensor(op, "prefix_len", prefix_len, device, at::kInt, {batch});
  check_contiguous(op, "prefix_len", prefix_len);
  TORCH_CHECK(width >= 1 && width <= kMaxTreeTokens, op, ": accepted_index must have 1 to ", kMaxTreeTokens,
              " columns on CUDA, got ", width);

  const c10::cuda::CUDAGuard guard(device);
  const Tensor accepted_c = accepted_index.contiguous();
  const Tensor num_accepted_c = num_accepted.contiguous();
  check_launch(op, msd::cuda::kv_compact(kv_cache.mutable_data_ptr(), accepted_c.const_data_ptr<int64_t>(),
                                         num_accepted_c.const_data_ptr<int64_t>(),
                                         prefix_len.mutable_data_ptr<int32_t>(), kv_cache.size(0), batch,
                                         kv_cache.size(2), kv_cache.size(3),
                                         kv_cache.size(4) * static_cast<int64_t>(kv_cache.element_size()), width,
                                         c10::cuda::getCurrentCUDAStream()));
}

// The tree tensors of verify_greedy / verify_sampling, all [B, T+1] int64 like `rows`' first two dims.
void check_tree(const char* op, const Tensor& rows, const Tensor& tree_tokens, const Tensor& first_child,
                const Tensor& next_sibling) {
  const c10::IntArrayRef shape = rows.sizes().slice(0, 2);
  check_tensor(op, "tree_tokens", tree_tokens, rows.device(), at::kLong, shape);
  check_tensor(op, "first_child", first_child, rows.device(), at::kLong, shape);
  check_tensor(op, "next_sibling", next_sibling, rows.device(), at::kLong, shape);
  TORCH_CHECK(rows.size(1) >= 1 && rows.size(1) <= kMaxTreeTokens, op, ": the tree must have 1 to ",
              kMaxTreeTokens, " tokens, got ", rows.size(1));
  TORCH_CHECK(rows.size(2) >= 1, op, ": the vocabulary must not be empty, got shape ", rows.sizes());
}

// accepted_index [B, T+1], num_accepted [B], bonus_token [B], all int64.
std::tuple<Tensor, Tensor, Tensor> verify_outputs(const Tensor& rows) {
  const int64_t batch = rows.size(0);
  return {new_empty(rows, {batch, rows.size(1)}, at::kLong), new_empty(rows, {batch}, at::kLong),
          new_empty(rows, {batch}, at::kLong)};
}

std::tuple<Tensor, Tensor, Tensor> verify_greedy(const Tensor& logits, const Tensor& tree_tokens,
                                                 const Tensor& first_child, const Tensor& next_sibling) {
  constexpr const char* op = "verify_greedy";
  check_leading(op, "logits", logits, 3);
  const FloatType logits_type = float_type(op, "logits", logits);
  check_tree(op, logits, tree_tokens, first_child, next_sibling);

  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor logits_c = logits.contiguous();
  const Tensor tokens_c = tree_tokens.contiguous();
  const Tensor first_c = first_child.contiguous();
  const Tensor next_c = next_sibling.contiguous();
  Tensor argmax = new_empty(logits, logits.sizes().slice(0, 2), at::kLong);
  auto [accepted_index, num_accepted, bonus_token] = verify_outputs(logits);
  check_launch(op, msd::cuda::verify_greedy(logits_c.const_data_ptr(), logits_type, tokens_c.const_data_ptr<int64_t>(),
                                            first_c.const_data_ptr<int64_t>(), next_c.const_data_ptr<int64_t>(),
                                            argmax.mutable_data_ptr<int64_t>(),
                                            accepted_index.mutable_data_ptr<int64_t>(),
                                            num_accepted.mutable_data_ptr<int64_t>(),
                                            bonus_token.mutable_data_ptr<int64_t>(), logits.size(0), logits.size(1),
                                            logits.size(2), c10::cuda::getCurrentCUDAStream()));
  return {accepted_index, num_accepted, bonus_token};
}

std::tuple<Tensor, Tensor, Tensor> verify_sampling(const Tensor& probs, const Tensor& tree_tokens,
                                                   const Tensor& first_child, const Tensor& next_sibling,
                                                   const Tensor& rng_state) {
  constexpr const char* op = "verify_sampling";
  check_leading(op, "probs", probs, 3);
  TORCH_CHECK(probs.scalar_type() == at::kFloat, op, ": probs must have dtype float32, got ", probs.scalar_type());
  check_tree(op, probs, tree_tokens, first_child, next_sibling);
  check_tensor(op, "rng_state", rng_state, probs.device(), at::kLong, {2});
  check_contiguous(op, "rng_state", rng_state);

  const c10::cuda::CUDAGuard guard(probs.device());
  const Tensor probs_c = probs.contiguous();
  const Tensor tokens_c = tree_tokens.contiguous();
  const Tensor first_c = first_child.contiguous();
  const Tensor next_c = next_sibling.contiguous();
  auto [accepted_index, num_accepted, bonus_token] = verify_outputs(probs);
  check_launch(op, msd::cuda::verify_sampling(
                       probs_c.const_data_ptr<float>(), tokens_c.const_data_ptr<int64_t>(),
                       first_c.const_data_ptr<int64_t>(), next_c.const_data_ptr<int64_t>(),
                       rng_state.mutable_data_ptr<int64_t>(), accepted_index.mutable_data_ptr<int64_t>(),
                       num_accepted.mutable_data_ptr<int64_t>(), bonus_token.mutable_data_ptr<int64_t>(),
                       probs.size(0), probs.size(1), probs.size(2), c10::cuda::getCurrentCUDAStream()));
  return {accepted_index, num_accepted, bonus_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(msd, CUDA, m) {
  m.impl("tree_expand", &tree_expand);
  m.impl("tree_assemble", &tree_assemble);
  m.impl("kv_compact", &kv_compact);
  m.impl("verify_greedy", &verify_greedy);
  m.impl("verify_sampling", &verify_sampling);
}
