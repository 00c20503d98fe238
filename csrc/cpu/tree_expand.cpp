// tree_expand on the CPU: one depth step of the dynamic draft tree (reference.tree_expand).
//
// Per (batch row, frontier node), three passes over its V logits, each a vectorised loop:
// the maximum, the sum of exp(x - max) (a polynomial exp), then the top_k children. The
// third pass ranks by log-probability computed exactly as torch.log_softmax does, but only
// for the few logits above the current k-th one, so a vector compare skips most of the row.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/ops_cpu.h"
#include "cpu/vec_math.h"
#include "msd/tree_build.h"

namespace msd::cpu {
namespace {

// Least logits per parallel task (a few hundred microseconds of work): below it, waking
// the pool costs more than it saves, and on a busy machine a descheduled worker stalls
// the whole call. One level of an EAGLE tree (10 x 32000) stays on one thread.
constexpr int64_t kMinTaskLogits = int64_t{1} << 19;
constexpr int64_t kScanBlock = 32;  // logits per test of the top-k scan

// log_softmax of one row of logits, as torch.log_softmax computes it: (x - max) - log(sum),
// in float32 and in that order, so that logits whose log-probabilities round to the same
// value tie-break the same way as in the reference (which ranks the log-probabilities).
// The function is non-decreasing in x. (Sums of exponentials differ from torch's in the
// last bits, as its own do across CPUs; that shifts every log-probability of the row alike.)
struct RowLogSoftmax {
  float max;
  float log_sum;  // log(sum_j exp(x_j - max)); NaN if the row has a NaN or max is infinite

  float operator()(float x) const { return (x - max) - log_sum; }
};

// The largest logit, NaN ignored; `has_nan` tells whether there was one.
MSD_CPU_CLONES float row_max(const float* __restrict row, int64_t vocab, bool& has_nan) {  // row: [V]
  float max = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : max) reduction(| : nan)
  for (int64_t j = 0; j < vocab; ++j) {
    max = row[j] > max ? row[j] : max;
    nan |= row[j] != row[j];
  }
  has_nan = nan != 0;
  return max;
}

// sum_j exp(x_j - max) over a row without NaN and with a finite max, so x_j - max <= 0,
// clamped at `floor` (-88, where exp_clamped reaches 0). The floor is an argument because
// gcc folds exp_clamped of a constant floor into a branch, which stops vectorisation.
MSD_CPU_CLONES float row_sum_exp(const float* __restrict row, int64_t vocab, float max,
                                 float floor) {  // row: [V]
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < vocab; ++j) sum += exp_clamped(std::max(row[j] - max, floor));
  return sum;
}

RowLogSoftmax row_log_softmax(const float* row, int64_t vocab) {  // row: [V]
  bool has_nan = false;
  const float max = row_max(row, vocab, has_nan);
  // As in torch: a NaN, or an infinite max (x - max is then NaN somewhere), makes every
  // log-probability NaN.
  if (has_nan || !std::isfinite(max)) return {max, std::numeric_limits<float>::quiet_NaN()};
  return {max, std::log(row_sum_exp(row, vocab, max, -88.f))};
}

// The top_k children of one row in `best` (capacity top_k, empty): the best log-probabilities,
// ties to the lower token. Tokens are offered in increasing order, so a logit x at most the
// current k-th one's cannot enter (its log-probability is at most the k-th's, and on a tie
// its token is the higher): whole blocks of such logits are skipped by one vector compare.
MSD_CPU_CLONES void top_children(const float* __restrict row, int64_t vocab, RowLogSoftmax log_prob,
                                 RunningTopK& best) {  // row: [V]
  const int64_t top_k = best.capacity;
  for (int64_t j = 0; j < top_k; ++j) best.offer(log_prob(row[j]), j);
  float kth = row[best.indices[top_k - 1]];  // the k-th child's logit
  const auto consider = [&](int64_t j) {
    if (row[j] > kth) {
      best.offer(log_prob(row[j]), j);
      kth = row[best.indices[top_k - 1]];
    }
  };
  int64_t j = top_k;
  for (; j + kScanBlock <= vocab; j += kScanBlock) {
    int above = 0;
#pragma omp simd reduction(| : above)
    for (int64_t i = 0; i < kScanBlock; ++i) above |= row[j + i] > kth;
    if (above) {
      for (int64_t i = j; i < j + kScanBlock; ++i) consider(i);
    }
  }
  for (; j < vocab; ++j) consider(j);
}

// Logits of another dtype are widened into a float32 row first.
template <typename scalar_t>
MSD_CPU_CLONES void widen(const scalar_t* __restrict row, int64_t vocab, float* __restrict out) {
  for (int64_t j = 0; j < vocab; ++j) out[j] = static_cast<float>(row[j]);
}

// One row of logits as float32: in place, or widened into `buffer` ([V]).
template <typename scalar_t>
const float* float_row(const scalar_t* row, int64_t vocab, std::vector<float>& buffer) {  // row: [V]
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buffer.resize(vocab);
    widen(row, vocab, buffer.data());
    return buffer.data();
  }
}

// The top_k children of one frontier node, written straight into its pool slots (which
// double as the running top-k buffers): tokens, cumulative scores and the parent.
void expand_node(const float* logits,  // [V] float32
                 int64_t vocab, float frontier_score, int64_t parent, int64_t top_k,
                 int64_t* tokens,  // [top_k] pool slots
                 float* scores,    // [top_k] pool slots
                 int64_t* parents  // [top_k] pool slots
) {
  RunningTopK best{scores, tokens, top_k};
  top_children(logits, vocab, row_log_softmax(logits, vocab), best);
  for (int64_t c = 0; c < top_k; ++c) {
    scores[c] += frontier_score;
    parents[c] = parent;
  }
}

// The next frontier of one batch row: the best top_k of the slots this step wrote.
void select_frontier(const int64_t* pool_tokens,  // [P] one batch row
                     const float* pool_scores,    // [P] one batch row
                     int64_t pool_offset, int64_t num_candidates, int64_t top_k,
                     int64_t* tokens,  // [top_k]
                     float* scores,    // [top_k]
                     int64_t* index    // [top_k] pool slots
) {
  RunningTopK best{scores, index, top_k};
  for (int64_t slot = pool_offset; slot < pool_offset + num_candidates; ++slot) best.offer(pool_scores[slot], slot);
  for (int64_t c = 0; c < top_k; ++c) tokens[c] = pool_tokens[index[c]];
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> tree_expand(
    const Tensor& logits,               // [B, n, V] float32/float16/bfloat16
    const Tensor& frontier_scores,      // [B, n] float32
    const Tensor& frontier_pool_index,  // [B, n] int64, -1 = root
    const Tensor& pool_tokens,          // [B, P] int64, written
    const Tensor& pool_scores,          // [B, P] float32, written
    const Tensor& pool_parents,         // [B, P] int64, written
    int64_t pool_offset, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 3, "tree_expand: logits must be [B, n, V], got ", logits.sizes());
  const int64_t batch = logits.size(0), num_frontier = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(frontier_scores.sizes() == at::IntArrayRef({batch, num_frontier}) &&
                  frontier_scores.scalar_type() == at::kFloat,
              "tree_expand: frontier_scores must be float32 [B, n] = [", batch, ", ", num_frontier,
              "], got ", frontier_scores.scalar_type(), " ", frontier_scores.sizes());
  TORCH_CHECK(frontier_pool_index.sizes() == frontier_scores.sizes() &&
                  frontier_pool_index.scalar_type() == at::kLong,
              "tree_expand: frontier_pool_index must be int64 [B, n] = [", batch, ", ", num_frontier,
              "], got ", frontier_pool_index.scalar_type(), " ", frontier_pool_index.sizes());
  TORCH_CHECK(pool_tokens.dim() == 2 && pool_tokens.size(0) == batch,
              "tree_expand: pool_tokens must be [B, P] with B = ", batch, ", got ", pool_tokens.sizes());
  const int64_t pool = pool_tokens.size(1);
  auto check_pool_tensor = [&](const char* name, const Tensor& tensor, at::ScalarType dtype) {
    TORCH_CHECK(tensor.sizes() == pool_tokens.sizes() && tensor.scalar_type() == dtype && tensor.is_contiguous(),
                "tree_expand: ", name, " must be a contiguous ", dtype, " [B, P] = ", pool_tokens.sizes(),
                " tensor (it is written in place), got ", tensor.scalar_type(), " ", tensor.sizes());
  };
  check_pool_tensor("pool_tokens", pool_tokens, at::kLong);
  check_pool_tensor("pool_scores", pool_scores, at::kFloat);
  check_pool_tensor("pool_parents", pool_parents, at::kLong);
  TORCH_CHECK(top_k >= 1 && top_k <= vocab, "tree_expand: top_k must be in [1, V = ", vocab, "], got ", top_k);
  TORCH_CHECK(pool_offset >= 0 && pool_offset + num_frontier * top_k <= pool,
              "tree_expand: pool_offset must be in [0, P - n * top_k = ", pool - num_frontier * top_k,
              "], got ", pool_offset);

  const Tensor index = frontier_pool_index.contiguous();
  const int64_t* index_ptr = index.data_ptr<int64_t>();
  // Pool slots are appended in step order, so a frontier node (a parent) precedes them.
  for (int64_t r = 0; r < batch * num_frontier; ++r) {
    TORCH_CHECK(index_ptr[r] >= -1 && index_ptr[r] < pool_offset, "tree_expand: frontier_pool_index[",
                r / num_frontier, ", ", r % num_frontier, "] = ", index_ptr[r],
                " is neither -1 nor a pool slot before pool_offset = ", pool_offset);
  }

  const Tensor logits_c = logits.contiguous();
  const Tensor scores_c = frontier_scores.contiguous();
  const float* frontier_ptr = scores_c.data_ptr<float>();
  int64_t* tokens_ptr = pool_tokens.data_ptr<int64_t>();
  float* scores_ptr = pool_scores.data_ptr<float>();
  int64_t* parents_ptr = pool_parents.data_ptr<int64_t>();

  // Children of every (batch row, frontier node), rows split into tasks of enough work.
  const int64_t grain = std::max<int64_t>(1, kMinTaskLogits / vocab);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_expand", [&] {
    const scalar_t* logits_ptr = logits_c.data_ptr<scalar_t>();
    at::parallel_for(0, batch * num_frontier, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> widened;
      for (int64_t r = begin; r < end; ++r) {
        const float* row = float_row(logits_ptr + r * vocab, vocab, widened);
        const int64_t slot = r / num_frontier * pool + expand_pool_slot(pool_offset, r % num_frontier, top_k, 0);
        expand_node(row, vocab, frontier_ptr[r], index_ptr[r], top_k, tokens_ptr + slot, scores_ptr + slot,
                    parents_ptr + slot);
      }
    });
  });

  // Next frontier: per batch row, the global top_k of the n * top_k new pool slots (a few
  // hundred candidates: one thread).
  Tensor next_tokens = at::empty({batch, top_k}, pool_tokens.options());
  Tensor next_scores = at::empty({batch, top_k}, pool_scores.options());
  Tensor next_index = at::empty({batch, top_k}, pool_tokens.options());
  for (int64_t b = 0; b < batch; ++b) {
    select_frontier(tokens_ptr + b * pool, scores_ptr + b * pool, pool_offset, num_frontier * top_k, top_k,
                    next_tokens.data_ptr<int64_t>() + b * top_k, next_scores.data_ptr<float>() + b * top_k,
                    next_index.data_ptr<int64_t>() + b * top_k);
  }
  return {next_tokens, next_scores, next_index};
}

}  // namespace msd::cpu
