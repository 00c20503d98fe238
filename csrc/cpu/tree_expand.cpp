// tree_expand on the CPU: one depth step of the dynamic draft tree (reference.tree_expand).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ops_cpu.h"
#include "msd/tree_build.h"

namespace msd::cpu {
namespace {

// Items per parallel task so that each task has at least ~32K elements of work (ATen's
// grain size): smaller tasks cost more in thread hand-off than they save.
int64_t items_per_task(int64_t elements_per_item) { return std::max<int64_t>(1, 32768 / elements_per_item); }

// log_softmax of one row of logits, as torch.log_softmax computes it: (x - max) - log(sum),
// in float32 and in that order, so that logits whose log-probabilities round to the same
// value tie-break the same way as in the reference (which ranks the log-probabilities).
struct RowLogSoftmax {
  float max;
  float log_sum;  // log(sum_j exp(x_j - max))

  float operator()(float x) const { return (x - max) - log_sum; }
};

template <typename scalar_t>
RowLogSoftmax row_log_softmax(const scalar_t* row, int64_t vocab) {  // row: [V]
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < vocab; ++j) max = std::max(max, static_cast<float>(row[j]));
  float sum = 0.f;
  for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<float>(row[j]) - max);
  return {max, std::log(sum)};
}

// The top_k children of one frontier node, written straight into its pool slots (which
// double as the running top-k buffers): tokens, cumulative scores and the parent.
template <typename scalar_t>
void expand_node(const scalar_t* logits,  // [V]
                 int64_t vocab, float frontier_score, int64_t parent, int64_t top_k,
                 int64_t* tokens,  // [top_k] pool slots
                 float* scores,    // [top_k] pool slots
                 int64_t* parents  // [top_k] pool slots
) {
  const RowLogSoftmax log_prob = row_log_softmax(logits, vocab);
  RunningTopK best{scores, tokens, top_k};
  for (int64_t j = 0; j < vocab; ++j) {
    const float x = static_cast<float>(logits[j]);
    // Log-probabilities do not decrease with the logit, so a logit below the current k-th
    // one cannot enter: skip computing and ranking its log-probability.
    if (best.size == top_k && x < static_cast<float>(logits[tokens[top_k - 1]])) continue;
    best.offer(log_prob(x), j);
  }
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

  // Children of every (batch row, frontier node): each row of V logits is one task.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_expand", [&] {
    const scalar_t* logits_ptr = logits_c.data_ptr<scalar_t>();
    at::parallel_for(0, batch * num_frontier, items_per_task(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t slot = r / num_frontier * pool + expand_pool_slot(pool_offset, r % num_frontier, top_k, 0);
        expand_node(logits_ptr + r * vocab, vocab, frontier_ptr[r], index_ptr[r], top_k, tokens_ptr + slot,
                    scores_ptr + slot, parents_ptr + slot);
      }
    });
  });

  // Next frontier: per batch row, the global top_k of the n * top_k new pool slots.
  Tensor next_tokens = at::empty({batch, top_k}, pool_tokens.options());
  Tensor next_scores = at::empty({batch, top_k}, pool_scores.options());
  Tensor next_index = at::empty({batch, top_k}, pool_tokens.options());
  const int64_t num_candidates = num_frontier * top_k;
  at::parallel_for(0, batch, items_per_task(num_candidates),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t b = begin; b < end; ++b) {
                       select_frontier(tokens_ptr + b * pool, scores_ptr + b * pool, pool_offset, num_candidates,
                                       top_k, next_tokens.data_ptr<int64_t>() + b * top_k,
                                       next_scores.data_ptr<float>() + b * top_k,
                                       next_index.data_ptr<int64_t>() + b * top_k);
                     }
                   });
  return {next_tokens, next_scores, next_index};
}

}  // namespace msd::cpu
