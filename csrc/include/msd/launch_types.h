// Plain C++ definitions shared by the CUDA kernels (msd/*.cuh) and their host launchers
// (csrc/cuda/launchers.h), which the torch glue includes: no CUDA or torch headers here.
#pragma once

namespace msd {

// Size limits of every implementation (msd_kernels/ops.py MAX_*); the CUDA kernels size
// their shared memory by them.
inline constexpr int kMaxTopK = 64;
inline constexpr int kMaxTreeTokens = 1024;  // T + 1
inline constexpr int kMaxPoolSize = 16384;

// Element type of a floating-point input (logits) passed as `const void*`.
enum class FloatType { kFloat32, kFloat16, kBFloat16 };

}  // namespace msd
