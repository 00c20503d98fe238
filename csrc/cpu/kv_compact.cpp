// KV-cache compaction on the CPU: move the accepted tree rows next to the prefix in every
// K/V plane at once, then advance prefix_len. Rows are copied as raw bytes, so any dtype
// works.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/ops_cpu.h"

namespace msd::cpu {
namespace {

// Bytes one parallel task should copy at least (as ATen's GRAIN_SIZE elements): below
// that, thread hand-off costs more than the copy.
constexpr int64_t kTaskBytes = 32768;
constexpr int64_t kCacheLine = 64;
constexpr int64_t kPrefetchSlabs = 4;  // how far ahead of the copy the prefetches run

// One sequence's move: rows prefix + source[j] -> prefix + j for j = 0 .. count - 1.
struct SequenceMove {
  int64_t prefix;
  int64_t count;          // a + 1 (root included)
  const int64_t* source;  // [count] tree indices (accepted_index row)
  bool forward_safe;      // source strictly increasing: copy in place, no staging
};

// `values` must be [batch] of `dtype` (one value per sequence).
void check_per_sequence(const char* name, const Tensor& values, int64_t batch, at::ScalarType dtype) {
  TORCH_CHECK(values.dim() == 1 && values.size(0) == batch && values.scalar_type() == dtype, "kv_compact: ",
              name, " must be [", batch, "] ", dtype, ", got ", values.sizes(), " ", values.scalar_type());
}

// Checks every value (before anything is written) and returns each sequence's move.
std::vector<SequenceMove> plan_moves(const Tensor& accepted_index, const Tensor& num_accepted,
                                     const Tensor& prefix_len, int64_t max_len) {
  const int64_t batch = accepted_index.size(0), width = accepted_index.size(1);
  const int64_t* index = accepted_index.data_ptr<int64_t>();
  const int64_t* counts = num_accepted.data_ptr<int64_t>();
  const int32_t* prefixes = prefix_len.data_ptr<int32_t>();
  std::vector<SequenceMove> moves(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t prefix = prefixes[b], accepted = counts[b];
    TORCH_CHECK(accepted >= 0 && accepted < width, "kv_compact: num_accepted[", b, "] = ", accepted,
                " is outside [0, ", width, ")");
    TORCH_CHECK(prefix >= 0 && prefix + accepted + 1 <= max_len, "kv_compact: prefix_len[", b, "] = ", prefix,
                " leaves no room for ", accepted + 1, " rows in a cache of ", max_len);
    const int64_t* source = index + b * width;
    bool increasing = true;
    for (int64_t j = 0; j <= accepted; ++j) {
      TORCH_CHECK(source[j] >= 0 && prefix + source[j] < max_len, "kv_compact: accepted_index[", b, ", ", j,
                  "] = ", source[j], " points outside the cache of ", max_len, " rows (prefix_len ", prefix,
                  ")");
      increasing = increasing && (j == 0 || source[j] > source[j - 1]);
    }
    moves[b] = {prefix, accepted + 1, source, increasing};
  }
  return moves;
}

// Slabs lie a whole head (S_max rows) apart, out of reach of the hardware prefetcher, and
// each moves only a few rows: asking for a later slab's rows while copying this one
// overlaps the DRAM latencies (2x faster on a cache far larger than the CPU caches).
void prefetch_move(const char* rows, const SequenceMove& move, int64_t row_bytes) {
  for (int64_t j = 0; j < move.count; ++j) {
    if (move.source[j] == j) continue;
    for (int64_t byte = 0; byte < row_bytes; byte += kCacheLine) {
      __builtin_prefetch(rows + move.source[j] * row_bytes + byte, /*rw=*/0);
      __builtin_prefetch(rows + j * row_bytes + byte, /*rw=*/1);
    }
  }
}

// Rows -> rows (one slab, `rows` at its prefix): row source[j] to row j. A row that stays
// put (source[j] == j, the root always does) is neither read nor written.
// With strictly increasing sources (the accepted path of a tree in index order, the usual
// case), source[k] >= k > j for every k after j, so an in-order copy never overwrites a
// row still to be read. Otherwise all rows are gathered into `staged`
// ([count * row_bytes]) before any is written.
void move_rows(char* rows, const SequenceMove& move, int64_t row_bytes, char* staged) {
  if (move.forward_safe) {
    for (int64_t j = 0; j < move.count; ++j) {
      if (move.source[j] != j) std::memcpy(rows + j * row_bytes, rows + move.source[j] * row_bytes, row_bytes);
    }
    return;
  }
  int64_t staged_rows = 0;
  for (int64_t j = 0; j < move.count; ++j) {
    if (move.source[j] != j) {
      std::memcpy(staged + staged_rows++ * row_bytes, rows + move.source[j] * row_bytes, row_bytes);
    }
  }
  staged_rows = 0;
  for (int64_t j = 0; j < move.count; ++j) {
    if (move.source[j] != j) {
      std::memcpy(rows + j * row_bytes, staged + staged_rows++ * row_bytes, row_bytes);
    }
  }
}

}  // namespace

void kv_compact(
    const Tensor& kv_cache,        // [N, B, H, S_max, D] any dtype, contiguous, edited in place
    const Tensor& accepted_index,  // [B, A] int64 tree indices, root first
    const Tensor& num_accepted,    // [B] int64, a < A
    const Tensor& prefix_len) {    // [B] int32, advanced by a + 1 in place
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(),
              "kv_compact: kv_cache must be a contiguous [N, B, H, S_max, D] tensor, got ", kv_cache.sizes());
  const int64_t planes = kv_cache.size(0), batch = kv_cache.size(1), heads = kv_cache.size(2);
  const int64_t max_len = kv_cache.size(3);
  TORCH_CHECK(accepted_index.dim() == 2 && accepted_index.size(0) == batch &&
                  accepted_index.scalar_type() == at::kLong,
              "kv_compact: accepted_index must be [", batch, ", A] int64, got ", accepted_index.sizes(),
              " ", accepted_index.scalar_type());
  check_per_sequence("num_accepted", num_accepted, batch, at::kLong);
  check_per_sequence("prefix_len", prefix_len, batch, at::kInt);
  TORCH_CHECK(prefix_len.is_contiguous(), "kv_compact: prefix_len must be contiguous (advanced in place)");
  const Tensor index = accepted_index.contiguous();
  const std::vector<SequenceMove> moves = plan_moves(index, num_accepted.contiguous(), prefix_len, max_len);

  const int64_t row_bytes = kv_cache.size(4) * static_cast<int64_t>(kv_cache.element_size());
  const int64_t head_bytes = max_len * row_bytes;
  const int64_t width = index.size(1);
  auto* cache = static_cast<char*>(kv_cache.data_ptr());
  // Slab = the [S_max, D] rows of one (plane, sequence, head); a few rows move in each,
  // so one task takes several slabs.
  const auto slab_move = [&](int64_t slab) -> const SequenceMove& {
    return moves[(slab / heads) % batch];
  };
  const auto slab_rows = [&](int64_t slab) {
    return cache + slab * head_bytes + slab_move(slab).prefix * row_bytes;
  };
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, width * row_bytes));
  at::parallel_for(0, planes * batch * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<char> staged(width * row_bytes);
    for (int64_t slab = begin; slab < end; ++slab) {
      const int64_t ahead = slab + kPrefetchSlabs;
      if (ahead < end) prefetch_move(slab_rows(ahead), slab_move(ahead), row_bytes);
      move_rows(slab_rows(slab), slab_move(slab), row_bytes, staged.data());
    }
  });

  int32_t* prefixes = prefix_len.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    prefixes[b] = static_cast<int32_t>(moves[b].prefix + moves[b].count);
  }
}

}  // namespace msd::cpu
