// Per-element math of the fused ops (docs/OPS.md), shared by the CPU extension and the CUDA kernels so
// that the CPU build runs the very code the GPU runs: loads of float32/bfloat16/float16 as float32,
// round-to-nearest-even stores, and the formulas of every op (MeZO, low-rank, magnitude mask, diagonal
// Hessian, anchored rescale). Torch-free.
//
// FMA contraction: the reference composes separately rounded float32 multiplies and adds, and so do we.
// On the device every multiply/add below is an explicit __fmul_rn/__fadd_rn/__fsub_rn, which nvcc never
// fuses whatever --fmad says; on the host the plain operators need -ffp-contract=off (the extension
// build passes it), else GCC/Clang fuse them on FMA targets such as aarch64 or -march=native x86. The one
// fused multiply-add is explicit: fma_rn, the low-rank sums' step (one rounding, the same on every target).
#pragma once

#include <stdint.h>
#include <string.h>

#include "zokern/philox.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

namespace zokern {

// Raw 16-bit storage, layout-compatible with at::BFloat16 / at::Half / __nv_bfloat16 / __half; the
// conversions below are the only ones used, on host and device alike.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

ZK_HD inline uint32_t float_as_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

ZK_HD inline float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---- float32 <- storage (all exact) ----

ZK_HD inline float to_float(float v) { return v; }

ZK_HD inline float to_float(bf16 v) { return bits_as_float(static_cast<uint32_t>(v.bits) << 16); }

// Exact half -> float without cuda_fp16.h, for the host.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {  // zero or subnormal: m · 2^-24
    const float v = static_cast<float>(m) * 0x1p-24f;
    return sign ? -v : v;
  }
  if (e == 31) return bits_as_float(sign | 0x7F800000u | (m << 13));  // inf / NaN (payload kept)
  return bits_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

ZK_HD inline float to_float(f16 v) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(v.bits));
#else
  return half_bits_to_float(v.bits);
#endif
}

// ---- storage <- float32, round to nearest even ----

// One rounding of the 32-bit pattern u at bit `shift` (1 <= shift <= 24), ties to even.
ZK_HD inline uint32_t shift_round_even(uint32_t u, uint32_t shift) {
  const uint32_t q = u >> shift, rem = u & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

ZK_HD inline uint32_t float_to_bf16_bits(float x) {
  const uint32_t u = float_as_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;  // NaN: the canonical one, as __float2bfloat16_rn
  return shift_round_even(u, 16);                        // a carry into the exponent is right, up to inf
}

// Portable, bit-exact float -> half with round-to-nearest-even, subnormals, overflow to inf, and NaN as
// the canonical 0x7FFF: the same bits as the GPU's cvt.rn.f16.f32 (__float2half_rn).
inline uint16_t float_to_half_bits(float x) {
  const uint32_t u = float_as_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7FFFu;
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 (halfway to 2^16): inf
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);            // <= 2^-25 (halfway to 2^-24): 0
  const uint32_t e = a >> 23;
  if (e >= 113) {  // normal half: rebias the exponent by 127 - 15, keep 10 mantissa bits
    return static_cast<uint16_t>(sign | shift_round_even(a - (112u << 23), 13));
  }
  // Subnormal half: the value in units of 2^-24 is the 24-bit significand shifted right by 126 - e;
  // rounding up to 0x400 yields the smallest normal, which is the right encoding.
  return static_cast<uint16_t>(sign | shift_round_even((a & 0x7FFFFFu) | 0x800000u, 126u - e));
}

template <class T>
ZK_HD T from_float(float x);

template <>
ZK_HD inline float from_float<float>(float x) {
  return x;
}

template <>
ZK_HD inline bf16 from_float<bf16>(float x) {
  return bf16{static_cast<uint16_t>(float_to_bf16_bits(x))};
}

template <>
ZK_HD inline f16 from_float<f16>(float x) {
#ifdef __CUDA_ARCH__
  if (x != x) return f16{0x7FFFu};  // the canonical NaN (docs/OPS.md), not left to the conversion instruction
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  return f16{float_to_half_bits(x)};
#endif
}

// ---- storage <- float32, stochastic rounding (docs/RANDOM.md, "Stochastic rounding") ----
// r: the element's rounding word, 16 random bits: half i & 1 (the low one first) of word (i >> 1) & 3 of Philox
// call i >> 3 in domain ROUNDING (stream version 5). Integer arithmetic on the float32 bit pattern: the result is
// one of the two storage values around x (by bit pattern: away from zero past the largest finite value is inf),
// the one away from zero with probability (discarded bits) / 2^k.

constexpr uint32_t kRoundingDomain = 4;  // Domain.ROUNDING
enum Rounding : int { kNearest = 0, kStochastic = 1 };

ZK_HD inline uint32_t float_to_bf16_bits_stochastic(float x, uint32_t r) {
  const uint32_t u = float_as_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;  // NaN: the canonical one
  return (u + (r & 0xFFFFu)) >> 16;                      // a carry into the exponent is right, up to inf
}

ZK_HD inline uint16_t float_to_half_bits_stochastic(float x, uint32_t r) {
  const uint32_t u = float_as_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7FFFu;
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 2^16 (inf included): inf
  const uint32_t e = a >> 23;
  if (e >= 113) {  // normal half: 13 bits discarded; a carry up to 0x7C00 is inf, as it should be
    return static_cast<uint16_t>(sign | ((a - (112u << 23) + (r & 0x1FFFu)) >> 13));
  }
  // Subnormal half (zero and float32 subnormals included): the value in units of 2^-24 is m / 2^s. Of the s
  // discarded bits the top 16 at most take part (exact for |x| >= 2^-17). m < 2^24: no overflow.
  const uint32_t s = e == 0 ? 125u : 126u - e;
  const uint32_t t = s < 16u ? s : 16u;
  const uint32_t m = (e == 0 ? (a & 0x7FFFFFu) : ((a & 0x7FFFFFu) | 0x800000u)) >> (s - t < 31u ? s - t : 31u);
  return static_cast<uint16_t>(sign | ((m + (r & ((1u << t) - 1u))) >> t));
}

// x stored in T: round to nearest even, or stochastically with the word r. float32 keeps x.
template <class T>
ZK_HD inline T from_float_rounded(float x, bool stochastic, uint32_t r);

template <>
ZK_HD inline float from_float_rounded<float>(float x, bool /*stochastic*/, uint32_t /*r*/) {
  return x;
}

template <>
ZK_HD inline bf16 from_float_rounded<bf16>(float x, bool stochastic, uint32_t r) {
  return stochastic ? bf16{static_cast<uint16_t>(float_to_bf16_bits_stochastic(x, r))} : from_float<bf16>(x);
}

template <>
ZK_HD inline f16 from_float_rounded<f16>(float x, bool stochastic, uint32_t r) {
  return stochastic ? f16{float_to_half_bits_stochastic(x, r)} : from_float<f16>(x);
}

// Word q (0 .. 3) of a Philox call, selected without indexing (an indexed local array would spill on a GPU).
ZK_HD inline uint32_t word_of(const Words& w, uint32_t q) {
  return q == 0 ? w.w[0] : q == 1 ? w.w[1] : q == 2 ? w.w[2] : w.w[3];
}

// The rounding words of stream elements i .. i+N-1 (N <= 8, any i): one Philox call holds eight.
template <int N>
ZK_HD inline void rounding_words_at(uint64_t seed, uint32_t stream, uint64_t i, uint32_t r[N]) {
  static_assert(N >= 1 && N <= 8, "at most two calls");
  const uint32_t phase = static_cast<uint32_t>(i & 7u);
  const Words a = philox(seed, stream, kRoundingDomain, i >> 3);
  const Words b = phase + N > 8 ? philox(seed, stream, kRoundingDomain, (i >> 3) + 1) : a;
  ZK_UNROLL
  for (int e = 0; e < N; ++e) {
    const uint32_t k = phase + e;  // 0 .. 14: elements of a, then of b
    const uint32_t word = k < 8 ? word_of(a, k >> 1) : word_of(b, (k >> 1) - 4);
    r[e] = (word >> (16 * (k & 1))) & 0xFFFFu;
  }
}

// ---- separately rounded float32 arithmetic (see the FMA note at the top) ----

ZK_HD inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ZK_HD inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ZK_HD inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// IEEE (correctly rounded) division and square root: the device's defaults may be approximate.
ZK_HD inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ZK_HD inline float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}

// acc + a·b rounded once (a fused multiply-add): the C++ kernels' low-rank sums are chains of these.
ZK_HD inline float fma_rn(float acc, float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, acc);
#else
  return fmaf(a, b, acc);
#endif
}

// ---- the ops of docs/OPS.md ----

// perturb: x + scale·z
ZK_HD inline float perturb_value(float x, float scale, float z) { return add_rn(x, mul_rn(scale, z)); }

// fused step without the next perturbation: x + restore·z, then x − lr·(grad·z + wd·x)
ZK_HD inline float step_value(float x, float z, float restore, float lr, float grad, float wd) {
  x = add_rn(x, mul_rn(restore, z));
  return sub_rn(x, mul_rn(lr, add_rn(mul_rn(grad, z), mul_rn(wd, x))));
}

// Each op has a per-element form, element(x, z, zn, ...): x in float32, z its perturbation, zn the next
// perturbation's (used only where next() >= 0; next() is that draw's seed, −1 for none). The CPU draws z
// and zn for whole blocks (csrc/cpu/zo_simd.h) and calls it per element; the four-element form below, one
// Philox call j, draws them itself (the CUDA kernels). Slots outside the tensor carry junk that the caller
// never stores. wd is the tensor's weight decay.
//
// Rounding: the caller stores what element() returns. stochastic() says whether the op needs the elements'
// rounding words (drawn under op.seed in domain ROUNDING) for 16-bit storage, stochastic_store() whether the
// caller stores with them; otherwise it rounds to nearest even. The ops that store an update take `rounding`.

// z and zn (zeros where op.next() < 0) of Philox call j.
template <class Op>
ZK_HD inline void draw_z(const Op& op, uint32_t stream, uint64_t j, float z[4], float zn[4]) {
  draw4(op.seed, stream, kPerturbation, op.dist, j, z);
  if (op.next() >= 0) {
    draw4(static_cast<uint64_t>(op.next()), stream, kPerturbation, op.dist, j, zn);
  } else {
    ZK_UNROLL
    for (int q = 0; q < 4; ++q) zn[q] = 0.f;
  }
}

struct MezoPerturbOp {
  uint64_t seed;
  float scale;
  int dist;

  ZK_HD int64_t next() const { return -1; }
  ZK_HD bool stochastic() const { return false; }
  ZK_HD bool stochastic_store() const { return false; }

  ZK_HD float element(float x, float z, float /*zn*/, float /*wd: no decay in a perturbation*/) const {
    return perturb_value(x, scale, z);
  }

  ZK_HD void operator()(uint32_t stream, float wd, uint64_t j, float x[4]) const {
    float z[4], zn[4];
    draw_z(*this, stream, j, z, zn);
    ZK_UNROLL
    for (int q = 0; q < 4; ++q) x[q] = element(x[q], z[q], zn[q], wd);
  }
};

struct MezoStepOp {
  uint64_t seed;
  float restore, lr, grad;
  int64_t next_seed;  // -1: no next perturbation
  float next_scale;
  int dist;
  int rounding;  // Rounding

  ZK_HD int64_t next() const { return next_seed; }
  ZK_HD bool stochastic() const { return rounding == kStochastic; }
  ZK_HD bool stochastic_store() const { return stochastic(); }

  ZK_HD float element(float x, float z, float zn, float wd) const {
    x = step_value(x, z, restore, lr, grad, wd);
    return next_seed >= 0 ? perturb_value(x, next_scale, zn) : x;
  }

  ZK_HD void operator()(uint32_t stream, float wd, uint64_t j, float x[4]) const {
    float z[4], zn[4];
    draw_z(*this, stream, j, z, zn);
    ZK_UNROLL
    for (int q = 0; q < 4; ++q) x[q] = element(x[q], z[q], zn[q], wd);
  }
};

// ---- low-rank perturbation (SubZero): W += (U·C)·Vᵀ ----
// Both backends sum over the rank in index order, from 0, with fma_rn: (U·C)[i, a] = Σ_b U[i, b]·C[b, a],
// then delta[i, j] = Σ_a (U·C)[i, a]·V[j, a], and W[i, j] = round(W[i, j] + delta[i, j]). So the CPU
// and the GPU agree bit for bit (the reference's BLAS order differs by rounding only).
//
// A bfloat16 W (stream version 6) takes delta from bfloat16 operands, in the order of the AMX instruction
// TDPBF16PS (Intel SDM), which the CPU runs where it has AMX (else, two steps an instruction, by AVX512-BF16's
// VDPBF16PS): lowrank_operand rounds (U·C)[i, a] and V[j, a] to
// bfloat16 and flushes magnitudes below 2^-51 to zero, so every product is exact in float32 and a multiple of
// 2^-116, and so is every sum of them (below 2^-92 a multiple of 2^-116 is a float32, above the spacing is one):
// nothing is ever subnormal, and the flush-to-zero of AMX and VDPBF16PS never acts. The rank goes in blocks of
// kLowrankBlock indices from 0; per block, e sums the even indices' products and o the odd ones, each in index
// order from 0, one rounding a step (a product is exact: a multiply-add and an add agree); then
// delta = delta + (e + o), delta from 0.
constexpr int kLowrankBlock = 32;

// The operand as bfloat16 bits, without branches (the CPU converts whole rows in SIMD): float_to_bf16_bits, then
// +0 for magnitudes below 2^-51 (bits 0x2600).
ZK_HD inline uint32_t lowrank_operand_bits(float x) {
  const uint32_t u = float_as_bits(x);
  const uint32_t b = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FFFu : shift_round_even(u, 16);
  return (b & 0x7FFFu) < 0x2600u ? 0u : b;
}

ZK_HD inline float lowrank_operand(float x) { return bits_as_float(lowrank_operand_bits(x) << 16); }

// z and zn (zeros where op.next() < 0) of stream elements i .. i+3, any i: call i >> 2 alone when i is a
// multiple of 4, else the last words of call i >> 2 and the first of the next one (static indices only, so the
// values stay in registers on the device).
template <class Op>
ZK_HD inline void draw_z_at(const Op& op, uint32_t stream, uint64_t i, float z[4], float zn[4]) {
  const uint32_t phase = static_cast<uint32_t>(i & 3u);
  if (phase == 0) {
    draw_z(op, stream, i >> 2, z, zn);
    return;
  }
  float a[8], an[8];
  draw_z(op, stream, i >> 2, a, an);
  draw_z(op, stream, (i >> 2) + 1, a + 4, an + 4);
  ZK_UNROLL
  for (int q = 0; q < 4; ++q) {
    z[q] = phase == 1 ? a[q + 1] : phase == 2 ? a[q + 2] : a[q + 3];
    zn[q] = phase == 1 ? an[q + 1] : phase == 2 ? an[q + 2] : an[q + 3];
  }
}

// ---- magnitude mask (Sparse MeZO) ----
// The masks are bit words: bit b of word w is the tensor's element 32w + b, whatever its element offset. An op
// handles four consecutive elements, stream elements i .. i+3, and their four mask bits (bit q <-> the q-th);
// the caller assembles whole words.

ZK_HD inline bool in_mask(float x, float h) { return fabsf(x) <= h; }  // NaN: out

// m·z as the reference multiplies a bool by z: ±0 where m is off, so even the sign of a zero sum agrees.
// m is a mask bit, 0 or 1: converted rather than selected, so the CPU's element loops vectorise without a
// branch on each (random) bit.
ZK_HD inline float sparse_z(uint32_t m, float z) { return mul_rn(static_cast<float>(static_cast<int32_t>(m)), z); }

// The four-element form takes the four mask bits (bit q <-> stream element i + q) and their rounding words
// r (read where op.stochastic()), and returns the four bits to store.
template <class T, class Op>
ZK_HD inline uint32_t sparse_apply4(const Op& op, uint32_t stream, float wd, float h, uint64_t i, float x[4],
                                    uint32_t bits, const uint32_t r[4]) {
  float z[4], zn[4];
  draw_z_at(op, stream, i, z, zn);
  uint32_t out = 0;
  ZK_UNROLL
  for (int q = 0; q < 4; ++q) {
    uint32_t m = (bits >> q) & 1u;
    x[q] = op.template element<T>(x[q], z[q], zn[q], wd, h, m, r[q]);
    out |= m << q;
  }
  return out;
}

struct SparsePerturbOp {
  uint64_t seed;
  float scale;
  int dist;
  bool compute_mask;

  ZK_HD int64_t next() const { return -1; }
  ZK_HD bool reads_mask() const { return !compute_mask; }
  ZK_HD bool writes_mask() const { return compute_mask; }
  ZK_HD bool stochastic() const { return false; }
  ZK_HD bool stochastic_store() const { return false; }

  // m: the stored mask bit (ignored when computing); becomes the bit used, to store if writes_mask.
  template <class T>
  ZK_HD float element(float x, float z, float /*zn*/, float /*wd*/, float h, uint32_t& m, uint32_t /*r*/) const {
    if (compute_mask) m = in_mask(x, h);
    return perturb_value(x, scale, sparse_z(m, z));
  }

  template <class T>
  ZK_HD uint32_t apply(uint32_t stream, float wd, float h, uint64_t i, float x[4], uint32_t bits,
                       const uint32_t r[4]) const {
    return sparse_apply4<T>(*this, stream, wd, h, i, x, bits, r);
  }
};

struct SparseStepOp {
  uint64_t seed;
  float restore, lr, grad;
  int64_t next_seed;  // -1: no next perturbation (and no new mask)
  float next_scale;
  int dist;
  int rounding;  // Rounding

  ZK_HD int64_t next() const { return next_seed; }
  ZK_HD bool reads_mask() const { return true; }
  ZK_HD bool writes_mask() const { return next_seed >= 0; }
  ZK_HD bool stochastic() const { return rounding == kStochastic; }
  // With a next perturbation the update is rounded inside element() and the perturbed weights to nearest,
  // as masked_perturb_ rounds them.
  ZK_HD bool stochastic_store() const { return stochastic() && next_seed < 0; }

  // T: the parameter dtype, whose rounding of the updated weights (word r) the next mask is taken from.
  // m: the stored mask bit; becomes the next perturbation's bit if there is one.
  template <class T>
  ZK_HD float element(float x, float z, float zn, float wd, float h, uint32_t& m, uint32_t r) const {
    x = update(x, z, wd, m);
    if (next_seed < 0) return x;
    x = to_float(from_float_rounded<T>(x, stochastic(), r));  // the weights this step stores
    return perturb_next(x, zn, h, m);
  }

  // element()'s halves, either side of the rounding to T (the CPU rounds a block of updated weights at once).
  ZK_HD float update(float x, float z, float wd, uint32_t m) const {
    return step_value(x, sparse_z(m, z), restore, lr, grad, wd);
  }
  ZK_HD float perturb_next(float x, float zn, float h, uint32_t& m) const {
    m = in_mask(x, h);
    return perturb_value(x, next_scale, sparse_z(m, zn));
  }

  template <class T>
  ZK_HD uint32_t apply(uint32_t stream, float wd, float h, uint64_t i, float x[4], uint32_t bits,
                       const uint32_t r[4]) const {
    return sparse_apply4<T>(*this, stream, wd, h, i, x, bits, r);
  }
};

// ---- diagonal Hessian (HiZOO) ----
// The ops take the four elements x of one Philox call and their Hessian entries d (float32 values of D);
// writes_d says whether d comes back updated.

ZK_HD inline float hizoo_z(float z, float d) { return div_rn(z, sqrt_rn(d)); }  // z / sqrt(D)

struct HizooPerturbOp {
  uint64_t seed;
  float scale;
  int dist;

  static constexpr bool writes_d = false;
  ZK_HD int64_t next() const { return -1; }
  ZK_HD bool stochastic() const { return false; }
  ZK_HD bool stochastic_store() const { return false; }

  ZK_HD float element(float x, float& d, float z, float /*zn*/, float /*wd*/) const {
    return perturb_value(x, scale, hizoo_z(z, d));
  }

  ZK_HD void operator()(uint32_t stream, float wd, uint64_t j, float x[4], float d[4]) const {
    float z[4], zn[4];
    draw_z(*this, stream, j, z, zn);
    ZK_UNROLL
    for (int q = 0; q < 4; ++q) x[q] = element(x[q], d[q], z[q], zn[q], wd);
  }
};

struct HizooStepOp {
  uint64_t seed;
  float restore, lr, grad, hess_scale, alpha;
  float one_minus_alpha;  // float32(1 − alpha) of the double, as the reference's scalar
  int64_t next_seed;      // -1: no next perturbation
  float next_scale;
  int dist;
  int rounding;  // Rounding of θ; D is stored to nearest

  static constexpr bool writes_d = true;
  ZK_HD int64_t next() const { return next_seed; }
  ZK_HD bool stochastic() const { return rounding == kStochastic; }
  ZK_HD bool stochastic_store() const { return stochastic(); }

  ZK_HD float element(float x, float& d, float z, float zn, float wd) const {
    x = add_rn(x, mul_rn(restore, hizoo_z(z, d)));  // restore with the old D
    d = add_rn(mul_rn(one_minus_alpha, d), mul_rn(alpha, mul_rn(mul_rn(hess_scale, d), mul_rn(z, z))));
    x = sub_rn(x, mul_rn(lr, add_rn(mul_rn(grad, hizoo_z(z, d)), mul_rn(wd, x))));  // update: new D
    return next_seed >= 0 ? perturb_value(x, next_scale, hizoo_z(zn, d)) : x;
  }

  ZK_HD void operator()(uint32_t stream, float wd, uint64_t j, float x[4], float d[4]) const {
    float z[4], zn[4];
    draw_z(*this, stream, j, z, zn);
    ZK_UNROLL
    for (int q = 0; q < 4; ++q) x[q] = element(x[q], d[q], z[q], zn[q], wd);
  }
};

// ---- anchored rescale (DiZO) ----

// a + (s − a)·f
ZK_HD inline float dizo_rescale_value(float a, float s, float f) { return add_rn(a, mul_rn(sub_rn(s, a), f)); }

// (x − a)², one term of ‖θ − θ0‖²
ZK_HD inline float square_diff(float x, float a) {
  const float t = sub_rn(x, a);
  return mul_rn(t, t);
}

}  // namespace zokern
