// CUDA building blocks shared by the msd kernels: element conversion, packed ranks, warp and
// block reductions and scans, launch-size helpers. Framework-free: no torch headers here.
//
// Kernels in the msd/*.cuh headers that are not templates are `static`, so that a header can
// be included by several translation units; their launchers live in csrc/cuda/*.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "msd/launch_types.h"

namespace msd::cuda {

inline constexpr int kWarpSize = 32;
inline constexpr int kMaxWarps = 32;  // 1024 threads, the largest block
inline constexpr unsigned kFullMask = 0xffffffffu;
inline constexpr int64_t kMaxGridBlocks = 2147483647;  // gridDim.x limit
inline constexpr int64_t kMaxRanked = int64_t{1} << 32;  // candidates pack_rank can index

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Calls fn(TypeTag<T>{}) with T the element type of `type`: float, __half or __nv_bfloat16.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Fn>
cudaError_t dispatch_float(FloatType type, Fn&& fn) {
  switch (type) {
    case FloatType::kFloat32: return fn(TypeTag<float>{});
    case FloatType::kFloat16: return fn(TypeTag<__half>{});
    case FloatType::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// A candidate's place in every msd ranking (top-k, argmax), packed into 64 bits so that a
// larger value ranks first and one integer comparison decides: the score in the high word
// (higher first; NaN above every number and -0 equal to +0, as torch.sort and torch.argmax
// treat them), the inverted index in the low word (ties go to the lower index). Needs
// 0 <= index < 2^32. No candidate packs to 0, which therefore means "none".
__device__ __forceinline__ uint64_t pack_rank(float score, int64_t index) {
  uint32_t bits = score != score ? 0x7fc00000u : (score == 0.0f ? 0u : __float_as_uint(score));
  // Flip negatives entirely and set the sign bit of positives: unsigned order = float order.
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}

__device__ __forceinline__ int64_t rank_index(uint64_t rank) {
  return 0xffffffffu - static_cast<uint32_t>(rank);
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

__device__ __forceinline__ int num_warps() { return static_cast<int>(blockDim.x) / kWarpSize; }

// Reduction over the 32 lanes of a warp; every lane gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

// Reduction over the block; every thread gets the result. Call from all threads; blockDim.x
// must be a multiple of 32. `scratch`: [kMaxWarps] shared, free again on return.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op, T* scratch) {
  value = warp_reduce(value, op);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < num_warps(); ++w) value = op(value, scratch[w]);
  __syncthreads();
  return value;
}

// Exclusive prefix sum over the block in thread order (the sum of the values of the lower
// threads); `*total` gets the block's sum. Same calling rules and `scratch` as block_reduce.
template <typename T>
__device__ T block_exclusive_scan(T value, T* scratch, T* total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  T inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  // Shifting the inclusive sums by one lane gives exact exclusive ones (no subtraction).
  const T lower_lanes = __shfl_up_sync(kFullMask, inclusive, 1);
  __syncthreads();
  T before = lane == 0 ? T{0} : lower_lanes;
  T sum = 0;
  for (int w = 0; w < num_warps(); ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  __syncthreads();
  *total = sum;
  return before;
}

// Threads for a block that strides over `work` items: a warp multiple in [32, max_threads].
inline int block_threads(int64_t work, int max_threads) {
  const int64_t rounded = (work + kWarpSize - 1) / kWarpSize * kWarpSize;
  return static_cast<int>(rounded < kWarpSize ? kWarpSize : (rounded > max_threads ? max_threads : rounded));
}

}  // namespace msd::cuda
