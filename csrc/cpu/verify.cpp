// Tree verification on the CPU: greedy (argmax) and lossless sampling, one batch row per
// task. The per-row walks live in msd/verify.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include "cpu/ops_cpu.h"
#include "msd/verify.h"

namespace msd::cpu {
namespace {

// Contiguous int64 copies of the tree tensors, checked once so the walks can index freely.
struct TreeTensors {
  Tensor tokens, first_child, next_sibling;  // [B, T+1] int64 each
  int64_t batch, size;

  TreeView row(int64_t b) const {
    return {tokens.data_ptr<int64_t>() + b * size, first_child.data_ptr<int64_t>() + b * size,
            next_sibling.data_ptr<int64_t>() + b * size, size};
  }
};

// Every value of `values` ([B, T+1] int64) in [low, high); the message names the argument
// and the first offending entry.
void check_range(const char* op, const char* name, const Tensor& values, int64_t low, int64_t high) {
  const int64_t* data = values.data_ptr<int64_t>();
  const int64_t cols = values.size(1);
  for (int64_t i = 0; i < values.numel(); ++i) {
    TORCH_CHECK(data[i] >= low && data[i] < high, op, ": ", name, "[", i / cols, ", ", i % cols, "] = ",
                data[i], " is outside [", low, ", ", high, ")");
  }
}

// Shapes of `scores` ([B, T+1, V]) and the tree tensors, and the values of the latter.
TreeTensors check_tree(const char* op, const char* scores_name, const Tensor& scores,
                       const Tensor& tree_tokens, const Tensor& first_child, const Tensor& next_sibling) {
  TORCH_CHECK(scores.dim() == 3, op, ": ", scores_name, " must be [B, T+1, V], got ", scores.sizes());
  const int64_t batch = scores.size(0), size = scores.size(1), vocab = scores.size(2);
  TORCH_CHECK(size >= 1 && vocab >= 1, op, ": ", scores_name, " needs T+1 >= 1 and V >= 1, got ",
              scores.sizes());
  const auto tree_tensor = [&](const char* name, const Tensor& t) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == size, op, ": ", name, " must be [", batch,
                ", ", size, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
    return t.contiguous();
  };
  TreeTensors tree{tree_tensor("tree_tokens", tree_tokens), tree_tensor("first_child", first_child),
                   tree_tensor("next_sibling", next_sibling), batch, size};
  check_range(op, "tree_tokens", tree.tokens, 0, vocab);
  check_range(op, "first_child", tree.first_child, -1, size);
  check_range(op, "next_sibling", tree.next_sibling, -1, size);
  return tree;
}

// Runs `walk(b, accepted_row)` -> WalkResult for every batch row in parallel and packs the
// outputs (accepted_index [B, T+1] -1 padded, num_accepted [B], bonus_token [B]).
template <typename Walk>
std::tuple<Tensor, Tensor, Tensor> verify_rows(const char* op, const TreeTensors& tree, Walk walk) {
  const auto options = tree.tokens.options();
  Tensor accepted = at::full({tree.batch, tree.size}, -1, options);
  Tensor num_accepted = at::empty({tree.batch}, options);
  Tensor bonus = at::empty({tree.batch}, options);
  int64_t* accepted_data = accepted.data_ptr<int64_t>();
  int64_t* num_data = num_accepted.data_ptr<int64_t>();
  int64_t* bonus_data = bonus.data_ptr<int64_t>();
  at::parallel_for(0, tree.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const WalkResult result = walk(b, accepted_data + b * tree.size);
      TORCH_CHECK(result.links_ok, op, ": first_child/next_sibling of sequence ", b,
                  " do not form a tree (a walk ran longer than its ", tree.size, " nodes)");
      num_data[b] = result.num_accepted;
      bonus_data[b] = result.bonus_token;
    }
  });
  return {accepted, num_accepted, bonus};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> verify_greedy(
    const Tensor& logits,         // [B, T+1, V] float32/float16/bfloat16
    const Tensor& tree_tokens,    // [B, T+1] int64
    const Tensor& first_child,    // [B, T+1] int64
    const Tensor& next_sibling) { // [B, T+1] int64
  const char* op = "verify_greedy";
  const TreeTensors tree = check_tree(op, "logits", logits, tree_tokens, first_child, next_sibling);
  const Tensor scores = logits.contiguous();
  const int64_t vocab = scores.size(2);
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "verify_greedy", [&] {
    const scalar_t* data = scores.data_ptr<scalar_t>();
    out = verify_rows(op, tree, [&](int64_t b, int64_t* accepted) {
      const scalar_t* rows = data + b * tree.size * vocab;
      // The argmax of a row is only needed if the walk reaches its node.
      const auto target_at = [&](int64_t node) { return argmax(rows + node * vocab, vocab); };
      return greedy_walk(tree.row(b), target_at, accepted);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> verify_sampling(
    const Tensor& probs,         // [B, T+1, V] float32
    const Tensor& tree_tokens,   // [B, T+1] int64
    const Tensor& first_child,   // [B, T+1] int64
    const Tensor& next_sibling,  // [B, T+1] int64
    const Tensor& rng_state) {   // [2] int64 (seed, offset), offset += 1 in place
  const char* op = "verify_sampling";
  const TreeTensors tree = check_tree(op, "probs", probs, tree_tokens, first_child, next_sibling);
  TORCH_CHECK(probs.scalar_type() == at::kFloat, op, ": probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.size(0) == 2 && rng_state.scalar_type() == at::kLong &&
                  rng_state.is_contiguous(),
              op, ": rng_state must be a contiguous [2] int64 tensor (seed, offset)");
  int64_t* state = rng_state.data_ptr<int64_t>();
  const uint64_t seed = static_cast<uint64_t>(state[0]), offset = static_cast<uint64_t>(state[1]);
  const Tensor scores = probs.contiguous();
  const float* data = scores.data_ptr<float>();
  const int64_t vocab = scores.size(2);
  auto out = verify_rows(op, tree, [&](int64_t b, int64_t* accepted) {
    return sampling_walk(tree.row(b), data + b * tree.size * vocab, vocab, seed, offset,
                         static_cast<uint32_t>(b), accepted);
  });
  state[1] = static_cast<int64_t>(offset + 1);  // wraps like the int64 tensor add
  return out;
}

}  // namespace msd::cpu
