// tree_assemble on the CPU: the T best pool candidates -> the verification tree
// (reference.tree_assemble).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/ops_cpu.h"
#include "msd/tree_build.h"

namespace msd::cpu {
namespace {

// Raw row pointers of one batch row of the tree_assemble outputs.
struct TreeRow {
  int64_t* tokens;        // [T+1]
  int64_t* depth;         // [T+1]
  int64_t* parent;        // [T+1]
  int64_t* mask;          // [T+1, words]
  int64_t* first_child;   // [T+1]
  int64_t* next_sibling;  // [T+1]
  int64_t words;
};

// Per-thread scratch, reused across the batch rows a thread assembles.
struct Scratch {
  std::vector<int64_t> kept;        // [P] pool indices; the first T are the kept ones
  std::vector<int64_t> tree_index;  // [P] tree index of each pool index, -1 if not kept
  std::vector<int64_t> last_child;  // [T+1] last child linked so far, -1 if none
};

void assemble_row(int64_t b, const int64_t* pool_tokens,  // [P] of batch row b
                  const float* pool_scores,               // [P]
                  const int64_t* pool_parents,            // [P]
                  int64_t root_token, int64_t num_nodes, Scratch& s, const TreeRow& out) {
  // The T best candidates (a selection, not a full sort), then in pool order, which puts
  // every parent before its children.
  std::iota(s.kept.begin(), s.kept.end(), 0);
  std::nth_element(s.kept.begin(), s.kept.begin() + (num_nodes - 1), s.kept.end(), [&](int64_t x, int64_t y) {
    return ranks_before(pool_scores[x], x, pool_scores[y], y);
  });
  std::sort(s.kept.begin(), s.kept.begin() + num_nodes);
  std::fill(s.tree_index.begin(), s.tree_index.end(), -1);
  for (int64_t i = 1; i <= num_nodes; ++i) s.tree_index[s.kept[i - 1]] = i;
  std::fill(s.last_child.begin(), s.last_child.end(), -1);

  const int64_t size = num_nodes + 1;
  std::fill(out.first_child, out.first_child + size, -1);
  std::fill(out.next_sibling, out.next_sibling + size, -1);
  out.tokens[0] = root_token;
  out.depth[0] = 0;
  out.parent[0] = -1;
  std::fill(out.mask, out.mask + out.words, 0);
  mask_set(out.mask, 0);

  for (int64_t i = 1; i <= num_nodes; ++i) {
    const int64_t p = s.kept[i - 1];
    const int64_t pool_parent = pool_parents[p];
    TORCH_CHECK(pool_parent >= -1 && pool_parent < p, "tree_assemble: pool_parents[", b, ", ", p, "] = ",
                pool_parent, " is not a smaller pool index or -1");
    const int64_t t = pool_parent == -1 ? 0 : s.tree_index[pool_parent];
    TORCH_CHECK(t != -1, "tree_assemble: pool_scores: kept candidate ", p, " of batch row ", b,
                " has a parent (", pool_parent, ") that is not kept; scores must not increase from parent to child");
    out.tokens[i] = pool_tokens[p];
    out.parent[i] = t;
    out.depth[i] = out.depth[t] + 1;
    // Ancestors of i: those of its parent (already built, t < i) and i itself.
    std::copy(out.mask + t * out.words, out.mask + (t + 1) * out.words, out.mask + i * out.words);
    mask_set(out.mask + i * out.words, i);
    if (s.last_child[t] == -1) {
      out.first_child[t] = i;
    } else {
      out.next_sibling[s.last_child[t]] = i;
    }
    s.last_child[t] = i;
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> tree_assemble(
    const Tensor& pool_tokens,   // [B, P] int64
    const Tensor& pool_scores,   // [B, P] float32
    const Tensor& pool_parents,  // [B, P] int64
    const Tensor& root_token,    // [B] int64
    int64_t num_nodes) {         // T
  TORCH_CHECK(pool_tokens.dim() == 2 && pool_tokens.scalar_type() == at::kLong,
              "tree_assemble: pool_tokens must be int64 [B, P], got ", pool_tokens.scalar_type(), " ",
              pool_tokens.sizes());
  const int64_t batch = pool_tokens.size(0), pool = pool_tokens.size(1);
  TORCH_CHECK(pool_scores.sizes() == pool_tokens.sizes() && pool_scores.scalar_type() == at::kFloat,
              "tree_assemble: pool_scores must be float32 [B, P] = ", pool_tokens.sizes(), ", got ",
              pool_scores.scalar_type(), " ", pool_scores.sizes());
  TORCH_CHECK(pool_parents.sizes() == pool_tokens.sizes() && pool_parents.scalar_type() == at::kLong,
              "tree_assemble: pool_parents must be int64 [B, P] = ", pool_tokens.sizes(), ", got ",
              pool_parents.scalar_type(), " ", pool_parents.sizes());
  TORCH_CHECK(root_token.sizes() == at::IntArrayRef({batch}) && root_token.scalar_type() == at::kLong,
              "tree_assemble: root_token must be int64 [B] = [", batch, "], got ", root_token.scalar_type(), " ",
              root_token.sizes());
  TORCH_CHECK(num_nodes >= 1 && num_nodes <= pool, "tree_assemble: num_nodes must be in [1, P = ", pool, "], got ",
              num_nodes);

  const Tensor tokens_in = pool_tokens.contiguous();
  const Tensor scores_in = pool_scores.contiguous();
  const Tensor parents_in = pool_parents.contiguous();
  const Tensor root_in = root_token.contiguous();
  const int64_t size = num_nodes + 1;
  const int64_t words = mask_words(size);
  const auto options = pool_tokens.options();
  // Every element is written below, so no zero-fill.
  Tensor tokens = at::empty({batch, size}, options);
  Tensor depth = at::empty({batch, size}, options);
  Tensor parent = at::empty({batch, size}, options);
  Tensor mask = at::empty({batch, size, words}, options);
  Tensor first_child = at::empty({batch, size}, options);
  Tensor next_sibling = at::empty({batch, size}, options);

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch{std::vector<int64_t>(pool), std::vector<int64_t>(pool), std::vector<int64_t>(size)};
    for (int64_t b = begin; b < end; ++b) {
      const TreeRow out{tokens.data_ptr<int64_t>() + b * size,      depth.data_ptr<int64_t>() + b * size,
                        parent.data_ptr<int64_t>() + b * size,      mask.data_ptr<int64_t>() + b * size * words,
                        first_child.data_ptr<int64_t>() + b * size, next_sibling.data_ptr<int64_t>() + b * size,
                        words};
      assemble_row(b, tokens_in.data_ptr<int64_t>() + b * pool, scores_in.data_ptr<float>() + b * pool,
                   parents_in.data_ptr<int64_t>() + b * pool, root_in.data_ptr<int64_t>()[b], num_nodes,
                   scratch, out);
    }
  });
  return {tokens, depth, parent, mask, first_child, next_sibling};
}

}  // namespace msd::cpu
