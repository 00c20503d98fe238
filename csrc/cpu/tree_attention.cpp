// tree_attention on CPU: attention of Q new tokens over a static KV cache; every query sees
// the whole prefix plus the new tokens its packed tree-mask row allows (a causal chunk when
// there is no mask). Semantics: msd_kernels/reference.py::tree_attention.
//
// Flash-style: one work item is (sequence, kv head, block of query rows), where the rows of
// a kv head are its `group` query heads x Q queries (contiguous in q). An online softmax in
// float32 runs over blocks of keys: first the prefix (visible to every query, so no mask
// test), then the Q new tokens (mask test). Each key block is converted to float once per
// work item, K transposed, so that both products are axpy loops over contiguous floats:
// the compiler vectorises those without having to reassociate a reduction.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/ops_cpu.h"
#include "msd/common.h"

// The extension is compiled for the baseline ISA (no -march): give the hot float loops an
// AVX2+FMA clone, picked by the dynamic loader on CPUs that have it.
#if defined(__x86_64__) && defined(__GNUC__)
#define MSD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MSD_CPU_CLONES
#endif

namespace msd::cpu {
namespace {

constexpr int64_t kKeyBlock = 64;  // keys per online-softmax step
constexpr int64_t kRowBlock = 64;  // query rows per work item, sharing each converted key block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// scores[r, j] = q[r, :] . k_t[:, j] for every key of the block (unused keys hold zeros).
// Four feature rows per pass: fewer loads and stores of `scores` per multiply-add.
MSD_CPU_CLONES void block_scores(
    const float* __restrict q,    // [rows, D] float32, already multiplied by the softmax scale
    const float* __restrict k_t,  // [D, kKeyBlock] float32, keys transposed
    float* __restrict scores,     // [rows, kKeyBlock] float32, written
    int64_t rows, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = q + r * head_dim;
    float* s = scores + r * kKeyBlock;
    std::fill(s, s + kKeyBlock, 0.f);
    int64_t d = 0;
    for (; d + 4 <= head_dim; d += 4) {
      const float* k = k_t + d * kKeyBlock;
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        s[j] += qr[d] * k[j] + qr[d + 1] * k[j + kKeyBlock] + qr[d + 2] * k[j + 2 * kKeyBlock] +
                qr[d + 3] * k[j + 3 * kKeyBlock];
      }
    }
    for (; d < head_dim; ++d) {
      for (int64_t j = 0; j < kKeyBlock; ++j) s[j] += qr[d] * k_t[d * kKeyBlock + j];
    }
  }
}

// Folds one key block into each row's running softmax: row_max is the largest score seen,
// row_sum the sum of exp(score - row_max) and acc the matching sum of exp(...) * value.
// Scores are overwritten with those exponentials.
MSD_CPU_CLONES void online_softmax_step(
    float* __restrict scores,        // [rows, kKeyBlock] float32, -inf = key not visible
    const float* __restrict values,  // [kKeyBlock, D] float32 (unused keys hold zeros)
    float* __restrict row_max,       // [rows] float32, updated
    float* __restrict row_sum,       // [rows] float32, updated
    float* __restrict acc,           // [rows, D] float32, updated
    int64_t rows, int64_t head_dim) {
  static_assert(kKeyBlock % 4 == 0, "the value loop takes four keys per pass");
  for (int64_t r = 0; r < rows; ++r) {
    float* p = scores + r * kKeyBlock;
    const float new_max = std::max(row_max[r], *std::max_element(p, p + kKeyBlock));
    if (new_max == kNegInf) continue;  // this row has seen no visible key yet
    float* o = acc + r * head_dim;
    const float rescale = std::exp(row_max[r] - new_max);  // 0 on the first visible block
    if (rescale != 1.f) {
      for (int64_t d = 0; d < head_dim; ++d) o[d] *= rescale;
    }
    float sum = row_sum[r] * rescale;
    for (int64_t j = 0; j < kKeyBlock; ++j) {
      p[j] = std::exp(p[j] - new_max);  // 0 for keys not visible
      sum += p[j];
    }
    // Four value rows per pass: fewer loads and stores of `o` per multiply-add.
    for (int64_t j = 0; j < kKeyBlock; j += 4) {
      const float* v = values + j * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        o[d] += p[j] * v[d] + p[j + 1] * v[d + head_dim] + p[j + 2] * v[d + 2 * head_dim] +
                p[j + 3] * v[d + 3 * head_dim];
      }
    }
    row_max[r] = new_max;
    row_sum[r] = sum;
  }
}

// Per-thread float32 scratch, reused across work items.
struct Scratch {
  explicit Scratch(int64_t head_dim)
      : q(kRowBlock * head_dim),
        k_t(head_dim * kKeyBlock),
        v(kKeyBlock * head_dim),
        scores(kRowBlock * kKeyBlock),
        row_max(kRowBlock),
        row_sum(kRowBlock),
        acc(kRowBlock * head_dim) {}
  std::vector<float> q, k_t, v, scores, row_max, row_sum, acc;
};

// One kv head of one sequence in the cache: row s of K is k + s * k_row_stride.
template <typename scalar_t>
struct KvHead {
  const scalar_t* k;  // [S_max, D], rows k_row_stride apart
  const scalar_t* v;  // [S_max, D], rows v_row_stride apart
  int64_t k_row_stride, v_row_stride;
};

// Cache rows [first, first + n) to float32: keys transposed into k_t, values as rows.
template <typename scalar_t>
void load_key_block(const KvHead<scalar_t>& kv, int64_t first, int64_t n, int64_t head_dim, Scratch& s) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* k = kv.k + (first + j) * kv.k_row_stride;
    const scalar_t* v = kv.v + (first + j) * kv.v_row_stride;
    float* v_out = s.v.data() + j * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      s.k_t[d * kKeyBlock + j] = static_cast<float>(k[d]);
      v_out[d] = static_cast<float>(v[d]);
    }
  }
  // Unused keys of a short block: zeros, so that the fixed-size loops read finite numbers.
  for (int64_t j = n; j < kKeyBlock; ++j) {
    for (int64_t d = 0; d < head_dim; ++d) s.k_t[d * kKeyBlock + j] = 0.f;
    std::fill(s.v.begin() + j * head_dim, s.v.begin() + (j + 1) * head_dim, 0.f);
  }
}

// What every work item shares.
struct Geometry {
  int64_t num_new;     // Q
  int64_t head_dim;    // D
  int64_t mask_words;  // words per mask row
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
    const int64_t* mask,   // [Q, mask_words] packed rows of this sequence, nullptr = causal
    const Geometry& g, Scratch& s) {
  const int64_t dim = g.head_dim;
  for (int64_t i = 0; i < rows * dim; ++i) s.q[i] = static_cast<float>(q[i]) * g.scale;
  std::fill(s.row_max.begin(), s.row_max.end(), kNegInf);
  std::fill(s.row_sum.begin(), s.row_sum.end(), 0.f);
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  // Scores of cache rows [first_key, first_key + n); the block's unused keys are not visible.
  const auto score_block = [&](int64_t first_key, int64_t n) {
    load_key_block(kv, first_key, n, dim, s);
    block_scores(s.q.data(), s.k_t.data(), s.scores.data(), rows, dim);
    for (int64_t r = 0; r < rows; ++r) {
      std::fill(s.scores.begin() + r * kKeyBlock + n, s.scores.begin() + (r + 1) * kKeyBlock, kNegInf);
    }
  };
  const auto fold_block = [&] {
    online_softmax_step(
        s.scores.data(), s.v.data(), s.row_max.data(), s.row_sum.data(), s.acc.data(), rows, dim);
  };

  for (int64_t first = 0; first < prefix; first += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, prefix - first);
    score_block(first, n);
    fold_block();
  }
  for (int64_t first = 0; first < g.num_new; first += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, g.num_new - first);
    score_block(prefix + first, n);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t query = (first_row + r) % g.num_new;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t token = first + j;
        const bool visible = mask ? mask_test(mask + query * g.mask_words, token) : token <= query;
        if (!visible) s.scores[r * kKeyBlock + j] = kNegInf;
      }
    }
    fold_block();
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float inv_sum = s.row_sum[r] > 0.f ? 1.f / s.row_sum[r] : 0.f;  // no visible key: zeros
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = static_cast<scalar_t>(s.acc[r * dim + d] * inv_sum);
  }
}

void check_inputs(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& prefix_len,
    const std::optional<Tensor>& tree_mask) {
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
  if (tree_mask) {
    TORCH_CHECK(
        tree_mask->sizes() == at::IntArrayRef({batch, num_new, mask_words(num_new)}) &&
            tree_mask->scalar_type() == at::kLong,
        "tree_attention: tree_mask must be [B, Q, ceil(Q/64)] = [", batch, ", ", num_new, ", ",
        mask_words(num_new), "] int64, got ", tree_mask->sizes(), " ", tree_mask->scalar_type());
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
    const std::optional<Tensor>& tree_mask,  // [B, Q, ceil(Q/64)] int64 or None (causal)
    std::optional<double> scale) {
  check_inputs(q, k_cache, v_cache, prefix_len, tree_mask);
  const int64_t batch = q.size(0), num_q_heads = q.size(1), num_new = q.size(2), head_dim = q.size(3);
  const int64_t num_kv_heads = k_cache.size(1), max_len = k_cache.size(2);
  const int64_t group = num_q_heads / num_kv_heads;

  const Tensor prefix = prefix_len.contiguous();
  const int32_t* prefix_ptr = prefix.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(
        prefix_ptr[b] >= 0 && prefix_ptr[b] + num_new <= max_len, "tree_attention: prefix_len[", b,
        "] = ", prefix_ptr[b], " must be >= 0 and leave room for Q = ", num_new,
        " new tokens in a cache of S_max = ", max_len, " rows");
  }

  const Tensor q_c = q.contiguous();
  // The cache is a large static buffer: read it through its strides instead of copying it;
  // only the feature dimension must be dense.
  const Tensor k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const Tensor v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  const Tensor mask = tree_mask ? tree_mask->contiguous() : Tensor();
  const int64_t words = mask_words(num_new);
  const Geometry geometry{
      num_new, head_dim, words,
      static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))))};
  Tensor out = at::empty_like(q_c);

  // Rows of one kv head: its `group` query heads x Q queries, contiguous in q and out.
  const int64_t head_rows = group * num_new;
  const int64_t row_blocks = (head_rows + kRowBlock - 1) / kRowBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention", [&] {
    const scalar_t* q_ptr = q_c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const int64_t* mask_ptr = mask.defined() ? mask.const_data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, batch * num_kv_heads * row_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(head_dim);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % row_blocks;
        const int64_t kv_head = item / row_blocks % num_kv_heads;
        const int64_t b = item / row_blocks / num_kv_heads;
        const KvHead<scalar_t> kv{
            k_ptr + b * k.stride(0) + kv_head * k.stride(1), v_ptr + b * v.stride(0) + kv_head * v.stride(1),
            k.stride(2), v.stride(2)};
        const int64_t first_row = block * kRowBlock;
        const int64_t q_offset = ((b * num_kv_heads + kv_head) * head_rows + first_row) * head_dim;
        attend_rows(
            q_ptr + q_offset, out_ptr + q_offset, first_row, std::min(kRowBlock, head_rows - first_row), kv,
            prefix_ptr[b], mask_ptr ? mask_ptr + b * num_new * words : nullptr, geometry, scratch);
      }
    });
  });
  return out;
}

}  // namespace msd::cpu
