// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11), host and device.
// The same numbers come out of reference.py's philox_uniform, the CPU and the CUDA ops,
// so sampling verification is reproducible across implementations.
#pragma once

#include <cstdint>

#include "msd/common.h"

namespace msd {

struct Philox4x32 {
  uint32_t v[4];
};

MSD_HOST_DEVICE MSD_INLINE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on `counter` with the 64-bit key (k0, k1).
MSD_HOST_DEVICE MSD_INLINE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, counter.v[0], &hi0, &lo0);
    philox_mulhilo(kM1, counter.v[2], &hi1, &lo1);
    counter = Philox4x32{{hi1 ^ counter.v[1] ^ k0, lo1, hi0 ^ counter.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return counter;
}

// Uniform float in [0, 1) for draw number `draw` of row `row`, given (seed, offset).
// counter = (draw, row, offset_lo, offset_hi), key = (seed_lo, seed_hi); the top 24
// bits of the first output word, so the value is exact in float32.
MSD_HOST_DEVICE MSD_INLINE float philox_uniform(uint64_t seed, uint64_t offset, uint32_t row, uint32_t draw) {
  const Philox4x32 counter{{draw, row, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  const Philox4x32 out = philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(out.v[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace msd
