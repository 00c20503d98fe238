// The one registration file: schemas of every msd op, and their CPU implementations.
// CUDA implementations register against the same schemas in cuda/ops_cuda.cpp and
// cuda/tree_attention_glue.cpp.
// Semantics: msd_kernels/reference.py. Mutated arguments are marked (a!).
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(msd, m) {
  // One depth step of the dynamic draft tree: log-softmax + top-k children per frontier
  // node, cumulative scores, append to the pool, global top-k as the next frontier.
  m.def(
      "tree_expand(Tensor logits, Tensor frontier_scores, Tensor frontier_pool_index, "
      "Tensor(a!) pool_tokens, Tensor(b!) pool_scores, Tensor(c!) pool_parents, "
      "int pool_offset, int top_k) -> (Tensor frontier_tokens, Tensor frontier_scores_out, "
      "Tensor frontier_pool_index_out)");
  // Pool -> the T best nodes: tokens, depths, parents, packed ancestor mask, links.
  m.def(
      "tree_assemble(Tensor pool_tokens, Tensor pool_scores, Tensor pool_parents, "
      "Tensor root_token, int num_nodes) -> (Tensor tokens, Tensor depth, Tensor parent, "
      "Tensor mask, Tensor first_child, Tensor next_sibling)");
  // Attention of Q queries over a static KV cache: whole prefix + tree (or causal); the
  // queries are the last Q of the tree_len tree rows (default Q).
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_len, "
      "Tensor? tree_mask=None, float? scale=None, int? tree_len=None) -> Tensor");
  // Move accepted rows next to the prefix in every K/V plane; advance prefix_len.
  m.def(
      "kv_compact(Tensor(a!) kv_cache, Tensor accepted_index, Tensor num_accepted, "
      "Tensor(b!) prefix_len) -> ()");
  // Greedy verification: fused argmax, longest agreeing path, bonus token.
  m.def(
      "verify_greedy(Tensor logits, Tensor tree_tokens, Tensor first_child, "
      "Tensor next_sibling) -> (Tensor accepted_index, Tensor num_accepted, Tensor bonus_token)");
  // Lossless sampling verification (sibling-by-sibling), Philox (seed, offset) on device.
  m.def(
      "verify_sampling(Tensor probs, Tensor tree_tokens, Tensor first_child, "
      "Tensor next_sibling, Tensor(a!) rng_state) -> (Tensor accepted_index, "
      "Tensor num_accepted, Tensor bonus_token)");
}

TORCH_LIBRARY_IMPL(msd, CPU, m) {
  m.impl("tree_expand", &msd::cpu::tree_expand);
  m.impl("tree_assemble", &msd::cpu::tree_assemble);
  m.impl("tree_attention", &msd::cpu::tree_attention);
  m.impl("kv_compact", &msd::cpu::kv_compact);
  m.impl("verify_greedy", &msd::cpu::verify_greedy);
  m.impl("verify_sampling", &msd::cpu::verify_sampling);
}
