// CPU only (nvcc never sees this): the vector types and helpers of the CPU kernels, which draw the random
// stream of zokern/philox.h for whole blocks of Philox calls in SIMD (zo_cpu_kernels.inc). Written with
// GCC/Clang vector extensions, so they compile for any target (SSE2, AVX2, AVX-512, NEON).
//
// Philox words are the scalar ones bit for bit (Rademacher signs too). Box–Muller takes u and t exactly as
// docs/RANDOM.md defines them (float32 values) and evaluates r·cos t and r·sin t in float64, with
// fdlibm's log/sin/cos polynomials (< 1 float64 ulp), rounding once to float32: the correctly rounded
// value but in rare near-ties, so the normals are within the reference's own error of it (measured: ≤ 3
// float32 ulps from zokern.random.reference_draw over 16M values). No FMA contraction (-ffp-contract=off)
// and no fast-math: every operation is an IEEE one, so all ISA levels give the same bits.
#pragma once

#include <stdint.h>
#include <string.h>

#include "zokern/element.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZK_X86 1
#endif

#define ZK_INLINE inline __attribute__((always_inline))
#ifdef ZK_X86
#define ZK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ZK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#endif

namespace zokern {
namespace simd {

constexpr int kLanes = 8;  // Philox calls per vector (8 float64 lanes per Box–Muller pair)
typedef uint32_t u32v __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32v __attribute__((vector_size(4 * kLanes)));
typedef uint64_t u64v __attribute__((vector_size(8 * kLanes)));
typedef int64_t i64v __attribute__((vector_size(8 * kLanes)));
typedef float f32v __attribute__((vector_size(4 * kLanes)));
typedef double f64v __attribute__((vector_size(8 * kLanes)));

template <class To, class From>
ZK_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "sizes differ");
  To out;
  memcpy(&out, &v, sizeof out);
  return out;
}

// Lanewise m ? a : b for a mask m of all-ones / all-zeros lanes.
ZK_INLINE f64v select(i64v m, f64v a, f64v b) {
  return bit_cast<f64v>((bit_cast<i64v>(a) & m) | (bit_cast<i64v>(b) & ~m));
}

}  // namespace simd
}  // namespace zokern
