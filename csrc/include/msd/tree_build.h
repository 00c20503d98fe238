// Ranking and pool layout of the draft-tree construction ops (tree_expand, tree_assemble),
// shared by the CPU and CUDA kernels. Framework-free: no torch headers here.
#pragma once

#include "msd/common.h"

namespace msd {

// Whether candidate (score `a`, index `ia`) ranks before (score `b`, index `ib`) in every
// top-k of the tree ops: the higher score first, ties to the lower index. NaN ranks above
// every number, as in torch.sort(descending=True), so that this is a strict total order
// (std::nth_element and friends are undefined behaviour on anything less).
MSD_HOST_DEVICE MSD_INLINE bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Pool slot of child `child` (0-based rank) of frontier node `node` in the expansion step
// whose first slot is `pool_offset`: each frontier node owns `top_k` consecutive slots.
MSD_HOST_DEVICE MSD_INLINE int64_t expand_pool_slot(int64_t pool_offset, int64_t node, int64_t top_k,
                                                    int64_t child) {
  return pool_offset + node * top_k + child;
}

// The best `capacity` of a stream of (score, index) candidates, kept sorted best first in
// caller-provided arrays. Offering V candidates costs O(V) comparisons plus O(capacity) per
// candidate that enters the list, far less than sorting all V when capacity << V.
struct RunningTopK {
  float* scores;     // [capacity]
  int64_t* indices;  // [capacity]
  int64_t capacity;
  int64_t size = 0;

  MSD_HOST_DEVICE void offer(float score, int64_t index) {
    if (size == capacity && !ranks_before(score, index, scores[size - 1], indices[size - 1])) return;
    int64_t pos = size < capacity ? size++ : capacity - 1;  // the slot freed for it
    for (; pos > 0 && ranks_before(score, index, scores[pos - 1], indices[pos - 1]); --pos) {
      scores[pos] = scores[pos - 1];
      indices[pos] = indices[pos - 1];
    }
    scores[pos] = score;
    indices[pos] = index;
  }
};

}  // namespace msd
