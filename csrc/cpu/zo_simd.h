// CPU only (nvcc never sees this): the vector types and helpers of the CPU kernels, which draw the random
// stream of zokern/philox.h for whole blocks of Philox calls in SIMD (zo_cpu_kernels.inc). Written with
// GCC/Clang vector extensions, so they compile for any target (SSE2, AVX2, AVX-512, NEON).
//
// Philox words are the scalar ones bit for bit (Rademacher signs too). Box–Muller takes u and t exactly as
// docs/RANDOM.md defines them and evaluates −2·log u, cos and sin with float32 polynomials (each within 1 ulp of
// the correctly rounded value), then the square root and the products in float32: the normals are within 3
// ulps of a float64 evaluation rounded once (stream version 7; docs/RANDOM.md). No FMA contraction
// (-ffp-contract=off) and no fast-math: every operation is an IEEE one, the fused multiply-adds explicit
// (zo_cpu_kernels.inc's fma_each), so all ISA levels give the same bits.
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
#define ZK_TARGET_AMX __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,amx-tile,amx-bf16")))
#define ZK_TARGET_DOT __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,avx512bf16")))
#endif

namespace zokern {
namespace simd {

constexpr int kLanes = 8;  // Philox calls per vector
// Low rank: Vᵀ (and the core) packed in panels of this many columns, rank index by rank index, so a register
// tile streams one contiguous panel; a multiple of every level's tile width (zo_cpu_kernels.inc).
constexpr int64_t kPanelCols = 64;
// bfloat16 goes kPairElems elements at a time as 32-bit words, the even elements in their low halves and the odd
// ones in their high halves, in "pair order": the even elements first, then the odd ones (zo_cpu_kernels.inc's
// load_pairs and store_pairs). For a bfloat16 W, each kPairElems columns of a low-rank panel are in pair order, so
// the tile's sums line up with W's row without a shuffle. The slot of column l of a panel:
constexpr int64_t kPairElems = 32;
inline int64_t panel_slot(int64_t l, bool pairs) {
  return pairs ? (l & ~(kPairElems - 1)) + (l & 1) * (kPairElems / 2) + (l & (kPairElems - 1)) / 2 : l;
}
// AMX (a bfloat16 W's low-rank sums, zo_cpu_kernels.inc's subzero_rows_amx): rows of W per tile, U·C's rows padded
// to a multiple; the bfloat16 Vᵀ block one TDPBF16PS takes, kLowrankBlock rank indices of 16 panel slots as 16 rows
// of pairs (rank indices 2p and 2p + 1 side by side for each slot).
constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxBlockWords = kLowrankBlock * 16;
// AVX512-BF16 (a bfloat16 W's low-rank sums where the CPU has no AMX, zo_cpu_kernels.inc's subzero_tile_dot): rank
// indices go by fours, 4s .. 4s + 3, as two 32-bit words of bfloat16 pairs, word 2s holding indices 4s and 4s + 2
// (the even sum's) and word 2s + 1 indices 4s + 1 and 4s + 3 (the odd sum's), the earlier index in the high half:
// VDPBF16PS adds the high halves' product first, then the low halves' (Intel SDM), so one instruction takes two
// steps of one sum in index order. A row of U·C is a row of such words; a panel of Vᵀ holds, word by word, the
// panel's kPanelCols slots (zo_cpu.cpp's dot_words).
// A bfloat16 W's operands in that layout: U·C's rows of `words` words, and Vᵀ's panels of words·kPanelCols.
struct DotOperands {
  const uint32_t* uc;
  const uint32_t* vt;
  int64_t words;
};
typedef uint32_t u32v __attribute__((vector_size(4 * kLanes)));
typedef uint64_t u64v __attribute__((vector_size(8 * kLanes)));
// Two words of each of kLanes calls side by side: Box–Muller takes both pairs of a vector of calls at once.
typedef uint32_t u32w __attribute__((vector_size(8 * kLanes)));
typedef int32_t i32w __attribute__((vector_size(8 * kLanes)));
typedef float f32w __attribute__((vector_size(8 * kLanes)));

template <class To, class From>
ZK_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "sizes differ");
  To out;
  memcpy(&out, &v, sizeof out);
  return out;
}

// Lanewise m ? a : b for a mask m of all-ones / all-zeros lanes (F a float vector, I the int vector as wide).
template <class I, class F>
ZK_INLINE F select(I m, F a, F b) {
  return bit_cast<F>((bit_cast<I>(a) & m) | (bit_cast<I>(b) & ~m));
}

// lo's lanes, then hi's.
ZK_INLINE u32w join(u32v lo, u32v hi) {
  static_assert(kLanes == 8, "the shuffle lists 2·kLanes lanes");
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// The stream's element order from two vectors of pairs: out[4l .. 4l+3] = a[l], b[l], a[kLanes+l], b[kLanes+l]
// (a holds words 0 and 2 of kLanes calls, b words 1 and 3, as Box–Muller's normals n0 and n1 do). In registers:
// built element by element, the order went through the stack as halves reloaded whole, which stalled.
template <class W>
ZK_INLINE void store_interleaved(W a, W b, void* out) {
  static_assert(kLanes == 8 && sizeof(W) == 8 * kLanes, "the shuffles list 2·kLanes lanes of 4 bytes");
  const W lo = __builtin_shufflevector(a, b, 0, 16, 8, 24, 1, 17, 9, 25, 2, 18, 10, 26, 3, 19, 11, 27);
  const W hi = __builtin_shufflevector(a, b, 4, 20, 12, 28, 5, 21, 13, 29, 6, 22, 14, 30, 7, 23, 15, 31);
  memcpy(out, &lo, sizeof lo);
  memcpy(static_cast<char*>(out) + sizeof lo, &hi, sizeof hi);
}

// The same 4·kLanes elements in pair order (kPairElems): the even elements a[0], a[kLanes], a[1], a[kLanes+1], …,
// then the odd ones, b's lanes in the same order. One shuffle of one vector each.
template <class W>
ZK_INLINE void store_pair_order(W a, W b, void* out) {
  static_assert(kLanes == 8 && sizeof(W) == 8 * kLanes && 4 * kLanes == kPairElems, "the shuffles list 2·kLanes lanes");
  const W even = __builtin_shufflevector(a, a, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const W odd = __builtin_shufflevector(b, b, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  memcpy(out, &even, sizeof even);
  memcpy(static_cast<char*>(out) + sizeof even, &odd, sizeof odd);
}

}  // namespace simd
}  // namespace zokern
