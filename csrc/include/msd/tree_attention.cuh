// CUDA kernels of op 2, tree_attention (semantics: msd_kernels/reference.tree_attention).
// Framework-free: raw pointers and sizes only; the launch code is csrc/cuda/tree_attention.cu.
//
// Attention of Q queries over a static KV cache. For sequence b the keys are the prefix
// 0 .. P-1 (P = prefix_len[b], visible to every query) followed by the tree_len >= Q tree
// rows P .. P+tree_len-1 (visible through the packed tree mask, or causally when there is
// none). The queries are the last Q tree rows: query i is tree row tree_len - Q + i
// (tree_len = Q but for the draft's tree levels, which follow the earlier levels' rows).
//
// Flash-decoding in two kernels:
//
// 1. split kernel, grid (B * Hkv, row tiles, splits). The key axis 0 .. S_max is cut into
//    `splits` chunks of whole 64-key tiles; the grid depends on S_max only, never on the
//    prefix_len values (read on the device), so a decoding step can be captured in a CUDA
//    graph. A block whose chunk starts at or beyond P+tree_len only marks its partials empty.
//    The query rows of one block are the (query head of the kv group, query) pairs
//    r = g * Q + i, g < Hq / Hkv, i < Q, cut into tiles of kTileM = 64 rows: every K/V
//    byte is read once per kv group and row tile, which is what bounds this op (the
//    cache is large, the queries few). The tree rows are just the last keys of the
//    sequence: a tile that reaches past the prefix applies the mask bits per element, so
//    the "small masked tree tile" needs no separate pass.
//
//    Per 64-key tile: K and V are copied to shared memory with 16-byte cp.async (rows past
//    P+tree_len zero-filled). Each of the 4 warps owns a 16-row strip of the query tile:
//      S = Q K^T   tensor cores (WMMA 16x16x16, fp16/bf16 inputs, fp32 accumulation)
//      softmax     online, fp32, base 2: per row the running max m and sum l live in
//                  registers (warp-uniform); O (fp32, shared memory) is rescaled
//      O += P V    tensor cores, P rounded to the input dtype as in FlashAttention
//    At the end each row writes O / l and lse = m + log2(l) (-inf when it saw no key).
//    WMMA hides the fragment layout, so S and O go through shared memory; the next step
//    for speed would be mma.sync with register-resident O and double-buffered K/V.
//
// 2. merge kernel, one block per output row (b, query head, query): the partials of all
//    splits are combined by log-sum-exp weights; a row that saw no key anywhere is zero.
//
// Needs sm_80+ (bf16 WMMA, cp.async). prefix_len values are clamped to [0, S_max - tree_len]
// so that a bad length can never make the kernel read outside the cache.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>

#include <cstdint>

#include "msd/common.h"

namespace msd::attention {

constexpr int kTileM = 64;                     // query rows per block
constexpr int kTileN = 64;                     // keys per shared-memory tile
constexpr int kWarps = 4;                      // each owns kWarpRows query rows
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = kTileM / kWarps;     // = one WMMA row strip
constexpr int kMma = 16;                       // WMMA tile edge (m = n = k = 16)
constexpr float kLog2e = 1.4426950408889634f;  // softmax runs in base 2 (exp2f)
static_assert(kWarpRows == kMma, "a warp owns exactly one 16-row WMMA strip");
static_assert(kTileN == 64, "the softmax gives each lane 2 of the 64 columns");

// Element strides (dims 0..2) of a [B, H, rows, D] tensor whose last dim is contiguous.
struct Strides {
  int64_t batch, head, row;
};

// Shared memory of the split kernel, in bytes from a 128-byte aligned base. Row pitches
// are padded (a multiple of 16 bytes, as WMMA and cp.async need) so that consecutive
// rows start in different banks.
template <typename T, int D>
struct SplitSmem {
  static constexpr int kPitch = D + 8;       // q/k/v tiles, elements of T
  static constexpr int kPitchS = kTileN + 4; // scores, float
  static constexpr int kPitchP = kTileN + 8; // probabilities, elements of T
  static constexpr int kPitchO = D + 4;      // output accumulator, float
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTileM * kPitch * int(sizeof(T));
  static constexpr int kV = kK + kTileN * kPitch * int(sizeof(T));
  static constexpr int kS = kV + kTileN * kPitch * int(sizeof(T));
  static constexpr int kP = kS + kTileM * kPitchS * int(sizeof(float));
  static constexpr int kO = kP + kTileM * kPitchP * int(sizeof(T));
  static constexpr int kBytes = kO + kTileM * kPitchO * int(sizeof(float));
  // WMMA pointers must be 32-byte aligned: region starts, 16-row strips and 16-column steps.
  static_assert(kK % 32 == 0 && kV % 32 == 0 && kS % 32 == 0 && kP % 32 == 0 && kO % 32 == 0,
                "shared-memory regions must stay 32-byte aligned");
  static_assert(D % kMma == 0, "head_dim must be a multiple of 16");
};

template <typename T>
MSD_INLINE __device__ T from_float(float x);
template <>
MSD_INLINE __device__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
MSD_INLINE __device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

MSD_INLINE __device__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

MSD_INLINE __device__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Whether the query at tree row `query_row` sees key `key`: the whole prefix, then the tree
// rows its mask row allows (`mask_row` = [ceil(tree_len/64)] int64 words), or tree rows
// 0..query_row when it is null.
MSD_INLINE __device__ bool key_visible(int key, int query_row, int prefix, int tree_len, const int64_t* mask_row) {
  if (key < prefix) return true;
  const int j = key - prefix;  // tree row
  if (j >= tree_len) return false;
  return mask_row != nullptr ? mask_test(mask_row, j) : j <= query_row;
}

// Block-cooperative copy of `rows` rows of D elements into shared memory (row pitch
// SplitSmem::kPitch) with 16-byte cp.async; `row_src(r)` is row r's source, or nullptr for
// a row to zero-fill. The caller commits and waits (__pipeline_commit / wait_prior).
template <typename T, int D, typename RowSource>
MSD_INLINE __device__ void copy_rows_async(T* smem, int rows, RowSource row_src) {
  constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte copy
  constexpr int kChunks = D / kVec;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * kVec;
    T* dst = smem + r * SplitSmem<T, D>::kPitch + col;
    const T* src = row_src(r);
    if (src != nullptr) {
      __pipeline_memcpy_async(dst, src + col, 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Phase 1+2: one block = (sequence b, kv head, 64 query rows, one chunk of keys).
// Launch: grid (B * Hkv, ceil(group * Q / 64), num_splits), kThreads threads,
// SplitSmem<T, D>::kBytes of dynamic shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tree_attention_split_kernel(
    const T* __restrict__ q,                  // [B, Hq, Q, D], strides q_strides
    Strides q_strides,
    const T* __restrict__ k_cache,            // [B, Hkv, S_max, D], strides k_strides
    Strides k_strides,
    const T* __restrict__ v_cache,            // [B, Hkv, S_max, D], strides v_strides
    Strides v_strides,
    const int32_t* __restrict__ prefix_len,   // [B] int32; clamped to [0, S_max - tree_len]
    const int64_t* __restrict__ tree_mask,    // [B, Q, ceil(tree_len/64)] int64 contiguous, or null: causal
    float* __restrict__ partial_out,          // [num_splits, B * Hq * Q, D] float32, O / l
    float* __restrict__ partial_lse,          // [num_splits, B * Hq * Q] float32, log2, -inf: empty
    int num_q_heads,                          // Hq
    int num_kv_heads,                         // Hkv, divides Hq
    int num_new,                              // Q >= 1
    int tree_len,                             // tree rows, Q <= tree_len <= S_max; the queries last
    int max_len,                              // S_max
    int tiles_per_split,                      // 64-key tiles per split
    float scale_log2) {                       // softmax scale * log2(e)
  using Smem = SplitSmem<T, D>;
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + Smem::kQ);
  T* k_s = reinterpret_cast<T*>(smem + Smem::kK);
  T* v_s = reinterpret_cast<T*>(smem + Smem::kV);
  float* s_s = reinterpret_cast<float*>(smem + Smem::kS);
  T* p_s = reinterpret_cast<T*>(smem + Smem::kP);
  float* o_s = reinterpret_cast<float*>(smem + Smem::kO);

  const int b = blockIdx.x / num_kv_heads;
  const int kv_head = blockIdx.x % num_kv_heads;
  const int group = num_q_heads / num_kv_heads;
  const int num_rows = group * num_new;  // query rows of this kv head
  const int row0 = blockIdx.y * kTileM;
  const int split = blockIdx.z;
  const int64_t all_rows = int64_t(gridDim.x / num_kv_heads) * num_q_heads * num_new;  // B*Hq*Q
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row0 = warp * kWarpRows;

  // Row r of this kv head -> query head g of the group, query i; output row index.
  auto out_row = [&](int r) {
    const int g = r / num_new;
    const int i = r % num_new;
    return (int64_t(b) * num_q_heads + kv_head * group + g) * num_new + i;
  };

  // Out-of-range values must not make us read outside the cache: clamp (bad input, bad output).
  const int prefix = min(max(prefix_len[b], 0), max_len - tree_len);
  const int key_end = prefix + tree_len;
  const int key_begin = split * tiles_per_split * kTileN;
  const int split_end = min(key_begin + tiles_per_split * kTileN, key_end);
  float* lse_out = partial_lse + split * all_rows;
  float* o_out = partial_out + split * all_rows * D;

  if (key_begin >= key_end) {  // chunk entirely past this sequence: an empty partial
    for (int r = threadIdx.x; r < kTileM; r += kThreads) {
      if (row0 + r < num_rows) lse_out[out_row(row0 + r)] = -INFINITY;
    }
    return;
  }

  copy_rows_async<T, D>(q_s, kTileM, [&](int r) -> const T* {
    if (row0 + r >= num_rows) return nullptr;
    const int g = (row0 + r) / num_new;
    const int i = (row0 + r) % num_new;
    return q + b * q_strides.batch + (kv_head * group + g) * q_strides.head + i * q_strides.row;
  });
  for (int e = threadIdx.x; e < kTileM * Smem::kPitchO; e += kThreads) o_s[e] = 0.f;

  // Online-softmax state of the warp's rows, identical in every lane (base-2 logits).
  float row_max[kWarpRows];
  float row_sum[kWarpRows];
#pragma unroll
  for (int rr = 0; rr < kWarpRows; ++rr) {
    row_max[rr] = -INFINITY;
    row_sum[rr] = 0.f;
  }
  // Warps whose 16 rows are all padding skip the math (they still take part in the copies).
  const bool warp_active = row0 + warp_row0 < num_rows;
  const T* k_base = k_cache + b * k_strides.batch + kv_head * k_strides.head;
  const T* v_base = v_cache + b * v_strides.batch + kv_head * v_strides.head;

  for (int tile = key_begin; tile < split_end; tile += kTileN) {
    __syncthreads();  // every warp is done with the previous K/V tile
    copy_rows_async<T, D>(k_s, kTileN, [&](int r) {
      return tile + r < key_end ? k_base + (tile + r) * k_strides.row : nullptr;
    });
    copy_rows_async<T, D>(v_s, kTileN, [&](int r) {
      return tile + r < key_end ? v_base + (tile + r) * v_strides.row : nullptr;
    });
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    if (!warp_active) continue;

    // S[strip, 0:64] = Q[strip] K^T (raw dot products, float32).
    wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::col_major> k_frag;
    wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::row_major> v_frag;
    wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
#pragma unroll
    for (int n = 0; n < kTileN; n += kMma) {
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int k = 0; k < D; k += kMma) {
        wmma::load_matrix_sync(a, q_s + warp_row0 * Smem::kPitch + k, Smem::kPitch);
        wmma::load_matrix_sync(k_frag, k_s + n * Smem::kPitch + k, Smem::kPitch);  // K^T
        wmma::mma_sync(acc, a, k_frag, acc);
      }
      wmma::store_matrix_sync(s_s + warp_row0 * Smem::kPitchS + n, acc, Smem::kPitchS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax, one row at a time, lane owns columns lane and lane + 32.
    const bool all_prefix = tile + kTileN <= prefix;  // every query sees every key of the tile
#pragma unroll
    for (int rr = 0; rr < kWarpRows; ++rr) {
      const int row = warp_row0 + rr;
      const int query = (row0 + row) % num_new;
      const int query_row = tree_len - num_new + query;
      const int64_t* mask_row =
          tree_mask != nullptr ? tree_mask + (int64_t(b) * num_new + query) * mask_words(tree_len) : nullptr;
      float logit[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = lane + 32 * h;
        const bool visible = all_prefix || key_visible(tile + col, query_row, prefix, tree_len, mask_row);
        logit[h] = visible ? s_s[row * Smem::kPitchS + col] * scale_log2 : -INFINITY;
      }
      const float new_max = fmaxf(row_max[rr], warp_max(fmaxf(logit[0], logit[1])));
      const float base = new_max == -INFINITY ? 0.f : new_max;  // no key yet: avoid inf - inf
      const float p0 = exp2f(logit[0] - base);
      const float p1 = exp2f(logit[1] - base);
      const float rescale = exp2f(row_max[rr] - base);
      row_sum[rr] = row_sum[rr] * rescale + warp_sum(p0 + p1);
      row_max[rr] = new_max;
      p_s[row * Smem::kPitchP + lane] = from_float<T>(p0);
      p_s[row * Smem::kPitchP + lane + 32] = from_float<T>(p1);
      for (int d = lane; d < D; d += 32) o_s[row * Smem::kPitchO + d] *= rescale;
    }
    __syncwarp();

    // O[strip] += P[strip] V.
#pragma unroll
    for (int d = 0; d < D; d += kMma) {
      float* o_tile = o_s + warp_row0 * Smem::kPitchO + d;
      wmma::load_matrix_sync(acc, o_tile, Smem::kPitchO, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kTileN; k += kMma) {
        wmma::load_matrix_sync(a, p_s + warp_row0 * Smem::kPitchP + k, Smem::kPitchP);
        wmma::load_matrix_sync(v_frag, v_s + k * Smem::kPitch + d, Smem::kPitch);
        wmma::mma_sync(acc, a, v_frag, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, Smem::kPitchO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Partials of the warp's rows: O / l and lse = m + log2(l); -inf (and no O) if empty.
#pragma unroll
  for (int rr = 0; rr < kWarpRows; ++rr) {
    const int r = row0 + warp_row0 + rr;
    if (r >= num_rows) continue;
    const int64_t out = out_row(r);
    const bool empty = row_sum[rr] == 0.f;
    if (lane == 0) lse_out[out] = empty ? -INFINITY : row_max[rr] + log2f(row_sum[rr]);
    if (empty) continue;
    const float inv_sum = 1.f / row_sum[rr];
    for (int d = lane; d < D; d += 32) o_out[out * D + d] = o_s[(warp_row0 + rr) * Smem::kPitchO + d] * inv_sum;
  }
}

// Phase 3: out[row] = sum_s w_s O_s / sum_s w_s, w_s = 2^(lse_s - max lse); zeros when
// no split saw a key. Launch: grid (B * Hq * Q), D threads (one per channel).
template <typename T, int D>
__global__ void __launch_bounds__(D) tree_attention_merge_kernel(
    const float* __restrict__ partial_out,  // [num_splits, rows, D] float32
    const float* __restrict__ partial_lse,  // [num_splits, rows] float32, -inf: empty
    T* __restrict__ out,                    // [rows, D] = [B, Hq, Q, D] contiguous
    int64_t rows,                           // B * Hq * Q
    int num_splits) {
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  float max_lse = -INFINITY;
  for (int s = 0; s < num_splits; ++s) max_lse = fmaxf(max_lse, partial_lse[s * rows + row]);
  float acc = 0.f;
  float weight = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float lse = partial_lse[s * rows + row];
    if (lse == -INFINITY) continue;  // empty split: its O was never written
    const float w = exp2f(lse - max_lse);
    acc += w * partial_out[(s * rows + row) * D + d];
    weight += w;
  }
  out[row * D + d] = from_float<T>(weight > 0.f ? acc / weight : 0.f);
}

}  // namespace msd::attention
