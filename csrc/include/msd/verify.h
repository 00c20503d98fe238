// Per-sequence tree verification walks (greedy and lossless sampling), host and device.
// One call verifies one sequence's tree; the CPU op runs one per batch row, a CUDA kernel
// can run one per thread. Semantics: msd_kernels/reference.py (verify_greedy,
// verify_sampling); the float32 / float64 choices below are the reference's, bit for bit.
//
// Link values must already be known to lie in [-1, size) and token ids in [0, vocab); the
// walks only guard against cycles, which they report instead of looping forever.
#pragma once

#include <cstdint>

#include "msd/common.h"
#include "msd/philox.h"

namespace msd {

// One sequence's draft tree, root at index 0 (each array [size] int64, -1 = no link).
struct TreeView {
  const int64_t* tokens;
  const int64_t* first_child;
  const int64_t* next_sibling;
  int64_t size;  // T + 1
};

// Outcome of one walk. accepted[0 .. num_accepted] holds the path (root first).
struct WalkResult {
  int64_t num_accepted;  // accepted draft nodes, root excluded
  int64_t bonus_token;
  bool links_ok;  // false: a sibling chain or the path ran longer than the tree (a cycle)
};

// Index of the largest value of row[0 .. n), n >= 1, as torch.argmax: first maximum wins,
// and a NaN counts as larger than any number.
template <typename T>
MSD_HOST_DEVICE int64_t argmax(const T* row, int64_t n) {
  int64_t best_index = 0;
  float best = static_cast<float>(row[0]);
  for (int64_t i = 1; i < n; ++i) {
    const float value = static_cast<float>(row[i]);
    if (value > best || (value != value && best == best)) {
      best = value;
      best_index = i;
    }
  }
  return best_index;
}

// Whether a sibling in [first, until) carries `token` (each earlier sibling was already
// walked, so the chain from `first` reaches `until`).
MSD_HOST_DEVICE MSD_INLINE bool earlier_sibling_has(const TreeView& tree, int64_t first, int64_t until,
                                                    int64_t token) {
  for (int64_t c = first; c != until; c = tree.next_sibling[c]) {
    if (tree.tokens[c] == token) return true;
  }
  return false;
}

// Smallest token >= `from` among the children of `node`, or `vocab` if none: lets the
// residual scan skip rejected tokens without a [vocab] scratch buffer. The sampling walk
// has already followed this sibling chain to its end, so it has no cycle.
MSD_HOST_DEVICE MSD_INLINE int64_t next_child_token(const TreeView& tree, int64_t node, int64_t from,
                                                    int64_t vocab) {
  int64_t next = vocab;
  for (int64_t c = tree.first_child[node]; c != -1; c = tree.next_sibling[c]) {
    const int64_t token = tree.tokens[c];
    if (token >= from && token < next) next = token;
  }
  return next;
}

// Bonus token drawn from what is left of p ([vocab] float32) once every child of `node`
// was rejected: the first token whose float64 running sum (children's tokens as 0)
// exceeds `threshold`, else the last token with p > 0 left, else argmax(p).
MSD_HOST_DEVICE MSD_INLINE int64_t sample_residual(const TreeView& tree, int64_t node, const float* p,
                                                   int64_t vocab, double threshold) {
  double running = 0.0;
  int64_t last_positive = -1;
  int64_t rejected = next_child_token(tree, node, 0, vocab);
  for (int64_t v = 0; v < vocab; ++v) {
    double q = p[v];
    if (v == rejected) {
      q = 0.0;
      rejected = next_child_token(tree, node, v + 1, vocab);
    }
    running += q;
    if (running > threshold) return v;
    if (q > 0.0) last_positive = v;
  }
  return last_positive != -1 ? last_positive : argmax(p, vocab);
}

// Greedy walk: from the root, move to the first child whose token is target_at(node)
// (the target's argmax there) while one exists; the bonus is the target at the last node.
// `target_at(node)` -> int64 may compute the argmax lazily: only the path's rows are asked.
template <typename TargetAt>
MSD_HOST_DEVICE WalkResult greedy_walk(const TreeView& tree, TargetAt target_at, int64_t* accepted) {
  int64_t node = 0;
  int64_t count = 0;
  accepted[0] = 0;
  while (true) {
    const int64_t target = target_at(node);
    int64_t match = -1;
    int64_t steps = 0;
    for (int64_t c = tree.first_child[node]; c != -1; c = tree.next_sibling[c]) {
      if (++steps > tree.size) return {count, target, false};
      if (tree.tokens[c] == target) {
        match = c;
        break;
      }
    }
    if (match == -1) return {count, target, true};
    if (count + 1 == tree.size) return {count, target, false};
    node = match;
    accepted[++count] = node;
  }
}

// Lossless sampling walk (MSD_SPEC.md 3.4) on processed probabilities ([size, vocab]
// float32). At each node, children in sibling order: accept x iff u * mass < p(x) in
// float32, else mass -= p(x) and x's token counts as p = 0 for later siblings. Draw n of
// this walk is philox_uniform(seed, offset, row, n).
MSD_HOST_DEVICE MSD_INLINE WalkResult sampling_walk(const TreeView& tree, const float* probs, int64_t vocab,
                                                    uint64_t seed, uint64_t offset, uint32_t row,
                                                    int64_t* accepted) {
  int64_t node = 0;
  int64_t count = 0;
  uint32_t draw = 0;
  accepted[0] = 0;
  while (true) {
    const float* p = probs + node * vocab;
    const int64_t first = tree.first_child[node];
    float mass = 1.0f;
    int64_t match = -1;
    int64_t steps = 0;
    for (int64_t c = first; c != -1; c = tree.next_sibling[c]) {
      if (++steps > tree.size) return {count, -1, false};
      const int64_t token = tree.tokens[c];
      const float p_token = earlier_sibling_has(tree, first, c, token) ? 0.0f : p[token];
      const float u = philox_uniform(seed, offset, row, draw++);
      if (u * mass < p_token) {
        match = c;
        break;
      }
      mass -= p_token;
    }
    if (match == -1) {
      const float u = philox_uniform(seed, offset, row, draw);
      const float threshold = u * mass;  // rounded to float32 before widening, as the reference
      return {count, sample_residual(tree, node, p, vocab, threshold), true};
    }
    if (count + 1 == tree.size) return {count, -1, false};
    node = match;
    accepted[++count] = node;
  }
}

}  // namespace msd
