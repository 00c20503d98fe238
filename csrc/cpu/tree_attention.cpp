// tree_attention on CPU: attention of Q queries over a static KV cache; every query sees
// the whole prefix plus the tree rows its packed tree-mask row allows (a causal chunk when
// there is no mask). The queries are the last Q of the tree_len tree rows (tree_len = Q
// but for the draft's tree levels). Semantics: msd_kernels/reference.py::tree_attention.
//
// Flash-style: one work item is (sequence, kv head, block of query rows), where the rows of
// a kv head are its `group` query heads x Q queries (contiguous in q), so that grouped
// heads share every key block. An online softmax in float32 runs over blocks of the cache
// rows 0 .. prefix + tree_len - 1; the mask is only tested on the blocks' tree columns. The
// two products of a block are oneDNN batch-reduce GEMM micro-kernels (ATen's cpublas::brgemm,
// which also serves ATen's own CPU flash attention); this file only packs their operands and
// does the softmax. A block always spans kKeyBlock keys (a short one is zero-padded), so
// the GEMM shapes depend on D and the row count only: the JIT-compiled kernels, cached per
// shape, stay few whatever prefix_len is.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/ops_cpu.h"
#include "cpu/vec_math.h"
#include "msd/common.h"

#ifndef CPUBLAS_BRGEMM_F32F32F32
#error "msd's CPU tree attention needs ATen's float32 cpublas::brgemm: build against torch >= 2.7"
#endif

namespace msd::cpu {
namespace {

using at::native::cpublas::brgemm;

constexpr int64_t kKeyBlock = 64;  // cache rows per online-softmax step
constexpr int64_t kMaxRows = 64;   // query rows per work item, sharing each packed key block
// Least work (multiply-adds) worth a thread of its own: below it, waking the pool costs
// more than it saves, and on a busy machine a descheduled worker stalls the whole call.
constexpr int64_t kMinTaskMacs = int64_t{1} << 21;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Folds one block of scores into each row's running softmax: row_max is the largest score
// seen, row_sum the sum of exp(score - row_max) and acc (the caller's P @ V accumulator) is
// rescaled to the new maximum. Scores are overwritten with those exponentials (0 for keys
// not visible), ready for acc += P @ V. The reductions are `omp simd` (-fopenmp is on) so
// that they may be reordered, hence vectorised.
MSD_CPU_CLONES void online_softmax_step(
    float* __restrict scores,   // [rows, kKeyBlock] float32, -inf = key not visible
    float* __restrict row_max,  // [rows] float32, updated
    float* __restrict row_sum,  // [rows] float32, updated
    float* __restrict acc,      // [rows, D] float32, rescaled
    int64_t rows, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    float* p = scores + r * kKeyBlock;
    float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < kKeyBlock; ++j) block_max = p[j] > block_max ? p[j] : block_max;
    const float new_max = std::max(row_max[r], block_max);
    if (new_max == kNegInf) {  // this row has seen no visible key yet: nothing to add
      std::fill(p, p + kKeyBlock, 0.f);
      continue;
    }
    if (new_max != row_max[r]) {
      const float rescale = std::exp(row_max[r] - new_max);  // 0 on the first visible block
      float* o = acc + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] *= rescale;
      row_sum[r] *= rescale;
      row_max[r] = new_max;
    }
    // Clamping in its own loop: gcc does not vectorise a loop that has both it and exp_clamped.
    for (int64_t j = 0; j < kKeyBlock; ++j) p[j] = p[j] - new_max > -88.f ? p[j] - new_max : -88.f;
    for (int64_t j = 0; j < kKeyBlock; ++j) p[j] = exp_clamped(p[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kKeyBlock; ++j) sum += p[j];
    row_sum[r] += sum;
  }
}

// Per-thread float32 scratch, reused across work items.
struct Scratch {
  explicit Scratch(int64_t head_dim)
      : q_t(head_dim * kMaxRows),
        k(kKeyBlock * head_dim),
        v(kKeyBlock * head_dim),
        scores_t(kKeyBlock * kMaxRows),
        scores(kMaxRows * kKeyBlock),
        row_max(kMaxRows),
        row_sum(kMaxRows),
        acc(kMaxRows * head_dim) {}
  std::vector<float> q_t, k, v, scores_t, scores, row_max, row_sum, acc;
};

// One kv head of one sequence in the cache: row s of K is k + s * k_row_stride.
template <typename scalar_t>
struct KvHead {
  const scalar_t* k;  // [S_max, D], rows k_row_stride apart
  const scalar_t* v;  // [S_max, D], rows v_row_stride apart
  int64_t k_row_stride, v_row_stride;
};

// Cache rows [first, first + n) of K or V as a GEMM operand [kKeyBlock, D] float32: read in
// place when they are float32 and a whole block, else converted into `buffer` with zero rows
// after n (their weights are 0, but 0 * garbage could be NaN). Sets `row_stride`.
template <typename scalar_t>
const float* cache_block(
    const scalar_t* rows, int64_t stride, int64_t first, int64_t n, int64_t head_dim, float* buffer,
    int64_t& row_stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kKeyBlock) {
      row_stride = stride;
      return rows + first * stride;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* row = rows + (first + j) * stride;
    for (int64_t d = 0; d < head_dim; ++d) buffer[j * head_dim + d] = static_cast<float>(row[d]);
  }
  std::fill(buffer + n * head_dim, buffer + kKeyBlock * head_dim, 0.f);
  row_stride = head_dim;
  return buffer;
}

// What every work item shares.
struct Geometry {
  int64_t num_new;     // Q
  int64_t tree_len;    // tree rows after the prefix, >= Q; query i is tree row tree_len - Q + i
  int64_t head_dim;    // D
  int64_t mask_words;  // words per mask row, ceil(tree_len/64)
  float scale;
};

// Attention of `rows` query rows of one kv head; row r is query (first_row + r) % Q.
template <typename scalar_t>
void attend_rows(
    const scalar_t* q,     // [rows, D]
    scalar_t* out,         // [rows, D], written
    int64_t first_row, int64_t rows,
    const KvHead<scalar_t>& kv,
    int64_t prefix,        // prefix_len of this sequence
    const int64_t* mask,   // [Q, ceil(tree_len/64)] packed rows of this sequence, nullptr = causal
    const Geometry& g, Scratch& s) {
  const int64_t dim = g.head_dim;
  // Scores are computed transposed, scores^T = K (q * scale)^T, so that K is read in place
  // from the cache; transposing the [kKeyBlock, rows] result back costs less than
  // transposing the [kKeyBlock, D] key block would (rows <= kMaxRows ~ D).
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) s.q_t[d * rows + r] = static_cast<float>(q[r * dim + d]) * g.scale;
  }
  std::fill(s.row_max.begin(), s.row_max.end(), kNegInf);
  std::fill(s.row_sum.begin(), s.row_sum.end(), 0.f);
  std::fill(s.acc.begin(), s.acc.end(), 0.f);

  const int64_t total = prefix + g.tree_len;
  for (int64_t first = 0; first < total; first += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, total - first);
    int64_t k_stride = 0, v_stride = 0;
    const float* k = cache_block(kv.k, kv.k_row_stride, first, n, dim, s.k.data(), k_stride);
    brgemm(kKeyBlock, rows, dim, k_stride, rows, rows, false, k, s.q_t.data(), s.scores_t.data());
    // scores = scores_t^T; columns [n, kKeyBlock) are padding, columns from `prefix` on are
    // tree rows, masked.
    const int64_t first_tree = std::clamp(prefix - first, int64_t{0}, n);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s.scores.data() + r * kKeyBlock;
      for (int64_t j = 0; j < n; ++j) row[j] = s.scores_t[j * rows + r];
      std::fill(row + n, row + kKeyBlock, kNegInf);
      if (first_tree == n) continue;  // prefix keys only (most blocks): all visible
      const int64_t query = (first_row + r) % g.num_new;
      const int64_t causal_limit = g.tree_len - g.num_new + query;  // the query's own tree row
      for (int64_t j = first_tree; j < n; ++j) {
        const int64_t token = first + j - prefix;  // tree row
        const bool visible = mask ? mask_test(mask + query * g.mask_words, token) : token <= causal_limit;
        if (!visible) row[j] = kNegInf;
      }
    }
    online_softmax_step(s.scores.data(), s.row_max.data(), s.row_sum.data(), s.acc.data(), rows, dim);
    // acc += P @ V
    const float* v = cache_block(kv.v, kv.v_row_stride, first, n, dim, s.v.data(), v_stride);
    brgemm(rows, dim, kKeyBlock, kKeyBlock, v_stride, dim, true, s.scores.data(), v, s.acc.data());
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float inv_sum = s.row_sum[r] > 0.f ? 1.f / s.row_sum[r] : 0.f;  // no visible key: zeros
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = static_cast<scalar_t>(s.acc[r * dim + d] * inv_sum);
  }
}

void check_inputs(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& prefix_len,
    const std::optional<Tensor>& tree_mask, std::optional<int64_t> tree_len_arg) {
  TORCH_CHECK(q.dim() == 4, "tree_attention: q must be [B, Hq, Q, D], got ", q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      "tree_attention: q must be float32, float16 or bfloat16, got ", dtype);
  const int64_t batch = q.size(0), num_q_heads = q.size(1), num_new = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(
      k_cache.dim() == 4 && k_cache.size(0) == batch && k_cache.size(3) == head_dim,
      "tree_attention: k_cache must be [B, Hkv, S_max, D] = [", batch, ", Hkv, S_max, ", head_dim,
      "], got ", k_cache.sizes());
  TORCH_CHECK(
      v_cache.sizes() == k_cache.sizes(), "tree_attention: v_cache must have the shape of k_cache ",
      k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(
      k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
      "tree_attention: k_cache and v_cache must have q's dtype ", dtype, ", got ", k_cache.scalar_type(),
      " and ", v_cache.scalar_type());
  const int64_t num_kv_heads = k_cache.size(1);
  TORCH_CHECK(
      num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "tree_attention: k_cache: query heads (",
      num_q_heads, ") must be a multiple of kv heads (", num_kv_heads, ")");
  TORCH_CHECK(
      prefix_len.dim() == 1 && prefix_len.size(0) == batch && prefix_len.scalar_type() == at::kInt,
      "tree_attention: prefix_len must be [B] = [", batch, "] int32, got ", prefix_len.sizes(), " ",
      prefix_len.scalar_type());
  const int64_t tree_len = tree_len_arg.value_or(num_new);
  TORCH_CHECK(
      num_new <= tree_len && tree_len <= k_cache.size(2), "tree_attention: tree_len = ", tree_len,
      " must be in [Q, S_max] = [", num_new, ", ", k_cache.size(2), "]");
  if (tree_mask) {
    TORCH_CHECK(
        tree_mask->sizes() == at::IntArrayRef({batch, num_new, mask_words(tree_len)}) &&
            tree_mask->scalar_type() == at::kLong,
        "tree_attention: tree_mask must be [B, Q, ceil(tree_len/64)] = [", batch, ", ", num_new, ", ",
        mask_words(tree_len), "] int64, got ", tree_mask->sizes(), " ", tree_mask->scalar_type());
  }
  for (const Tensor* t : {&q, &k_cache, &v_cache, &prefix_len}) {
    TORCH_CHECK(t->is_cpu(), "tree_attention: the CPU kernel needs every input on the CPU");
  }
  TORCH_CHECK(!tree_mask || tree_mask->is_cpu(), "tree_attention: tree_mask must be on the CPU");
}

}  // namespace

Tensor tree_attention(
    const Tensor& q,                         // [B, Hq, Q, D] float32/float16/bfloat16
    const Tensor& k_cache,                   // [B, Hkv, S_max, D] q's dtype
    const Tensor& v_cache,                   // [B, Hkv, S_max, D] q's dtype
    const Tensor& prefix_len,                // [B] int32
    const std::optional<Tensor>& tree_mask,  // [B, Q, ceil(tree_len/64)] int64 or None (causal)
    std::optional<double> scale,             // softmax scale or None: 1/sqrt(D)
    std::optional<int64_t> tree_len_arg) {   // tree rows >= Q, the queries last; None: Q
  check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, tree_len_arg);
  const int64_t batch = q.size(0), num_q_heads = q.size(1), num_new = q.size(2), head_dim = q.size(3);
  const int64_t tree_len = tree_len_arg.value_or(num_new);
  const int64_t num_kv_heads = k_cache.size(1), max_len = k_cache.size(2);
  const int64_t group = num_q_heads / num_kv_heads;

  const Tensor prefix = prefix_len.contiguous();
  const int32_t* prefix_ptr = prefix.data_ptr<int32_t>();
  int64_t longest_prefix = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(
        prefix_ptr[b] >= 0 && prefix_ptr[b] + tree_len <= max_len, "tree_attention: prefix_len[", b,
        "] = ", prefix_ptr[b], " must be >= 0 and leave room for tree_len = ", tree_len,
        " tree rows in a cache of S_max = ", max_len, " rows");
    longest_prefix = std::max<int64_t>(longest_prefix, prefix_ptr[b]);
  }

  const Tensor q_c = q.contiguous();
  // The cache is a large static buffer: read it through its strides instead of copying it;
  // only the feature dimension must be dense.
  const Tensor k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const Tensor v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  const Tensor mask = tree_mask ? tree_mask->contiguous() : Tensor();
  const int64_t words = mask_words(tree_len);
  const Geometry geometry{
      num_new, tree_len, head_dim, words,
      static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))))};
  Tensor out = at::empty_like(q_c);

  // Rows of one kv head: its `group` query heads x Q queries, contiguous in q and out; split
  // into blocks of equal size (fewer GEMM shapes than a short last block).
  const int64_t head_rows = group * num_new;
  const int64_t row_blocks = (head_rows + kMaxRows - 1) / kMaxRows;
  const int64_t block_rows = (head_rows + row_blocks - 1) / row_blocks;
  const int64_t item_macs = 2 * block_rows * (longest_prefix + tree_len) * head_dim;  // QK^T and PV
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, item_macs));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention", [&] {
    const scalar_t* q_ptr = q_c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const int64_t* mask_ptr = mask.defined() ? mask.const_data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, batch * num_kv_heads * row_blocks, grain, [&](int64_t begin, int64_t end) {
      Scratch scratch(head_dim);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % row_blocks;
        const int64_t kv_head = item / row_blocks % num_kv_heads;
        const int64_t b = item / row_blocks / num_kv_heads;
        const KvHead<scalar_t> kv{
            k_ptr + b * k.stride(0) + kv_head * k.stride(1), v_ptr + b * v.stride(0) + kv_head * v.stride(1),
            k.stride(2), v.stride(2)};
        const int64_t first_row = block * block_rows;
        const int64_t q_offset = ((b * num_kv_heads + kv_head) * head_rows + first_row) * head_dim;
        attend_rows(
            q_ptr + q_offset, out_ptr + q_offset, first_row, std::min(block_rows, head_rows - first_row), kv,
            prefix_ptr[b], mask_ptr ? mask_ptr + b * num_new * words : nullptr, geometry, scratch);
      }
      at::native::cpublas::brgemm_release(/*is_vnni=*/false);  // the float32 kernels' hardware state
    });
  });
  return out;
}

}  // namespace msd::cpu
