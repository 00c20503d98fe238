// Vectorisable float math of the CPU kernels (host only, unlike csrc/include/msd).
#pragma once

#include <cstdint>
#include <cstring>

// The extension is compiled for the baseline ISA (no -march): give the hot loops AVX2 and
// AVX-512 clones, picked by the dynamic loader on CPUs that have them.
#if defined(__x86_64__) && defined(__GNUC__)
#define MSD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSD_CPU_CLONES
#endif

namespace msd::cpu {

// e^x for -88 <= x <= 0 (a score minus its row's maximum, clamped), within ~2 ulp of expf
// above -87.6 and exactly 0 below (where expf is subnormal). Plain arithmetic, unlike
// std::exp, so that loops over it vectorise: x = n ln2 + r with |r| <= ln2/2 (ln2 split
// in two for an exact product), e^r by Cephes expf's degree-6 polynomial, 2^n put straight
// into the exponent bits (n = -127 gives +0).
inline float exp_clamped(float x) {
  const int32_t n = static_cast<int32_t>(x * 1.44269504f - 0.5f);  // round(x / ln2) for x <= 0
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

}  // namespace msd::cpu
