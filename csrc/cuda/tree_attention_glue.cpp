// Torch glue of the CUDA tree_attention: argument checks, output and workspace, launch.
// The kernels know nothing of torch (csrc/cuda/tree_attention.cu, msd/tree_attention.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "cuda/tree_attention_launch.h"

namespace msd::cuda {
namespace {

using at::Tensor;

// q/k/v are read with 16-byte loads: last dim contiguous, the base and the other strides
// aligned (strides of size-1 dims are never used).
bool vector_loadable(const Tensor& t) {
  bool aligned = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) == 1 || t.stride(d) % 8 == 0);
  return aligned;
}

// `t` itself where the kernel can read it, else a fresh dense copy (as the CPU kernel does for a
// strided last dim): any layout the reference accepts works, the usual ones without a copy.
// clone, not contiguous(): a contiguous view at an odd element offset needs a new base too.
Tensor loadable(const Tensor& t) { return vector_loadable(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

void check_on_device(const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "tree_attention: ", name, " must be on ", q.device(),
              " like q, got ", t.device());
}

Tensor tree_attention_cuda(const Tensor& q,                         // [B, Hq, Q, D] float16/bfloat16
                           const Tensor& k_cache,                   // [B, Hkv, S_max, D] q's dtype
                           const Tensor& v_cache,                   // [B, Hkv, S_max, D] q's dtype
                           const Tensor& prefix_len,                // [B] int32
                           const std::optional<Tensor>& tree_mask,  // [B, Q, ceil(tree_len/64)] int64 or None
                           std::optional<double> scale,             // None: 1/sqrt(D)
                           std::optional<int64_t> tree_len_arg) {   // tree rows >= Q, queries last; None: Q
  TORCH_CHECK(q.is_cuda(), "tree_attention: q must be a CUDA tensor, got ", q.device());
  check_on_device("k_cache", k_cache, q);
  check_on_device("v_cache", v_cache, q);
  check_on_device("prefix_len", prefix_len, q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "tree_attention: q must be float16 or bfloat16 on CUDA, got ", q.scalar_type(),
              " (float32 is supported on the CPU only)");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "tree_attention: k_cache and v_cache must have the dtype of q (", q.scalar_type(), "), got ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK(q.dim() == 4, "tree_attention: q must be [B, Hq, Q, D], got shape ", q.sizes());
  const int64_t batch = q.size(0), num_q_heads = q.size(1), num_new = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128,
              "tree_attention: q head_dim must be 64, 80, 96 or 128 on CUDA, got ", head_dim);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == batch && k_cache.size(3) == head_dim,
              "tree_attention: k_cache must be [B=", batch, ", Hkv, S_max, D=", head_dim, "], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "tree_attention: v_cache must have the shape of k_cache ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t num_kv_heads = k_cache.size(1), max_len = k_cache.size(2);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "tree_attention: k_cache kv heads (",
              num_kv_heads, ") must divide the query heads of q (", num_q_heads, ")");
  TORCH_CHECK(num_new <= max_len, "tree_attention: q has ", num_new, " new tokens, more than the ", max_len,
              " rows of k_cache");
  const int64_t tree_len = tree_len_arg.value_or(num_new);
  TORCH_CHECK(num_new <= tree_len && tree_len <= max_len, "tree_attention: tree_len = ", tree_len,
              " must be in [Q, S_max] = [", num_new, ", ", max_len, "]");
  TORCH_CHECK(prefix_len.dim() == 1 && prefix_len.size(0) == batch && prefix_len.scalar_type() == at::kInt,
              "tree_attention: prefix_len must be [B=", batch, "] int32, got shape ", prefix_len.sizes(), " ",
              prefix_len.scalar_type());
  Tensor mask;
  if (tree_mask.has_value()) {
    check_on_device("tree_mask", *tree_mask, q);
    const int64_t words = (tree_len + 63) / 64;
    TORCH_CHECK(tree_mask->scalar_type() == at::kLong && tree_mask->dim() == 3 && tree_mask->size(0) == batch &&
                    tree_mask->size(1) == num_new && tree_mask->size(2) == words,
                "tree_attention: tree_mask must be [B=", batch, ", Q=", num_new, ", ceil(tree_len/64)=", words,
                "] int64, got shape ", tree_mask->sizes(), " ", tree_mask->scalar_type());
    mask = tree_mask->contiguous();  // a few KB
  }

  Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard device_guard(q.device());
  const Tensor q_c = loadable(q);
  const Tensor k_c = loadable(k_cache);
  const Tensor v_c = loadable(v_cache);
  const Tensor lengths = prefix_len.contiguous();

  TreeAttentionProblem problem{};
  problem.dtype = q.scalar_type() == at::kHalf ? AttentionDtype::kFloat16 : AttentionDtype::kBFloat16;
  problem.batch = static_cast<int>(batch);
  problem.num_q_heads = static_cast<int>(num_q_heads);
  problem.num_kv_heads = static_cast<int>(num_kv_heads);
  problem.num_new = static_cast<int>(num_new);
  problem.tree_len = static_cast<int>(tree_len);
  problem.head_dim = static_cast<int>(head_dim);
  problem.max_len = static_cast<int>(max_len);
  problem.q = q_c.data_ptr();
  problem.k_cache = k_c.data_ptr();
  problem.v_cache = v_c.data_ptr();
  for (int d = 0; d < 3; ++d) {
    problem.q_strides[d] = q_c.stride(d);
    problem.k_strides[d] = k_c.stride(d);
    problem.v_strides[d] = v_c.stride(d);
  }
  problem.prefix_len = lengths.data_ptr<int32_t>();
  problem.tree_mask = mask.defined() ? mask.data_ptr<int64_t>() : nullptr;
  problem.scale = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))));
  problem.out = out.data_ptr();

  TreeAttentionSplit split{};
  cudaError_t err = tree_attention_split(problem, &split);
  TORCH_CHECK(err == cudaSuccess, "tree_attention: querying the device failed: ", cudaGetErrorString(err));
  const int64_t rows = batch * num_q_heads * num_new;
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor partial_out = at::empty({split.num_splits, rows, head_dim}, f32);
  Tensor partial_lse = at::empty({split.num_splits, rows}, f32);
  err = tree_attention(problem, split, partial_out.data_ptr<float>(), partial_lse.data_ptr<float>(),
                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "tree_attention: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace msd::cuda

TORCH_LIBRARY_IMPL(msd, CUDA, m) { m.impl("tree_attention", &msd::cuda::tree_attention_cuda); }
