// The zokern random stream (docs/RANDOM.md), for host and device: Philox4x32-10 and the mapping of its
// words to normals (Box–Muller, both pairs) and Rademacher signs (a word's top bit, or one bit each). Torch-free; the CPU extension, the CUDA
// kernels and nvcc_check.cu all compile this one definition.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define ZK_HD __host__ __device__
#else
#define ZK_HD
#endif
// Unrolling hint for the device pass only: host compilers do not know "#pragma unroll".
#ifdef __CUDA_ARCH__
#define ZK_UNROLL _Pragma("unroll")
#else
#define ZK_UNROLL
#endif

namespace zokern {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// float32(2π) · 2^-24, exact: one rounding turns the top 24 bits of a word into an angle in [0, 2π).
constexpr float kTwoPi2m24 = 0x1.921fb6p-22f;

enum Dist : int { kNormal = 0, kRademacher = 1, kRademacherBit = 2 };
enum Domain : uint32_t { kPerturbation = 0 };

struct Words {
  uint32_t w[4];
};

// Philox4x32-10 of call j (kNormal, kRademacher: element i uses call i >> 2, word i & 3; kRademacherBit: call
// i >> 7, word (i >> 5) & 3, bit i & 31): counter (j lo, j hi, stream, domain),
// key (seed lo, seed hi).
ZK_HD inline Words philox(uint64_t seed, uint32_t stream, uint32_t domain, uint64_t j) {
  uint32_t c0 = static_cast<uint32_t>(j), c1 = static_cast<uint32_t>(j >> 32), c2 = stream, c3 = domain;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
ZK_UNROLL
  for (int r = 0; r < kPhiloxRounds; ++r) {
    // A 32x32->64 product: nvcc emits mul.wide.u32 (= __umulhi + mul.lo), so one spelling serves both.
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Words{{c0, c1, c2, c3}};
}

// The top 24 bits of a word as a float in (0, 1], exact (Box–Muller's u: log(u) is finite).
ZK_HD inline float uniform_open0(uint32_t a) {
  return static_cast<float>((a >> 8) + 1u) * 0x1p-24f;
}

// One Box–Muller pair. Accurate libm/CUDA functions (never __sinf/__logf or fast-math) keep backends
// within a few float32 ulps of each other.
ZK_HD inline void box_muller(uint32_t a, uint32_t b, float& n0, float& n1) {
  const float u = uniform_open0(a);
  const float t = static_cast<float>(b >> 8) * kTwoPi2m24;
  const float r = sqrtf(-2.0f * logf(u));
  n0 = r * cosf(t);
  n1 = r * sinf(t);
}

ZK_HD inline float rademacher(uint32_t w) {
  return (w >> 31) ? -1.0f : 1.0f;
}

// kRademacherBit: −1 where bit b (0 = least significant) of w is set, else +1.
ZK_HD inline float rademacher_bit(uint32_t w, uint32_t b) {
  return ((w >> b) & 1u) ? -1.0f : 1.0f;
}

// Elements 4j .. 4j+3 of stream (seed, stream, domain): the four values of call j, or for kRademacherBit
// bits 4(j & 7) .. 4(j & 7) + 3 of word (j >> 3) & 3 of call j >> 5.
ZK_HD inline void draw4(uint64_t seed, uint32_t stream, uint32_t domain, int dist, uint64_t j, float z[4]) {
  if (dist == kRademacherBit) {
    const Words w = philox(seed, stream, domain, j >> 5);
    const uint32_t word = w.w[(j >> 3) & 3u], first = 4u * static_cast<uint32_t>(j & 7u);
ZK_UNROLL
    for (int q = 0; q < 4; ++q) z[q] = rademacher_bit(word, first + q);
    return;
  }
  const Words w = philox(seed, stream, domain, j);
  if (dist == kRademacher) {
ZK_UNROLL
    for (int q = 0; q < 4; ++q) z[q] = rademacher(w.w[q]);
  } else {
    box_muller(w.w[0], w.w[1], z[0], z[1]);
    box_muller(w.w[2], w.w[3], z[2], z[3]);
  }
}

}  // namespace zokern
