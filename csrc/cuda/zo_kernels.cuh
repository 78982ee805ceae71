// Torch-free CUDA kernels of zokern. The element-wise ops are multi-tensor applies (apex multi_tensor_apply
// style): one launch per dtype group over a device table of tensors, each cut into chunks of `chunk`
// elements. A block takes a chunk (grid-stride over all chunks of the launch, persistent grid), finds its
// tensor by binary search over the table's chunk prefix, and each thread handles 8 consecutive elements per
// step, i.e. two whole Philox calls: one 16-byte access per array for bf16/fp16, two for float32. Element
// indices are 64-bit. The low-rank op has its own tile kernels (below). The per-element math lives in
// zokern/element.h, shared with the CPU build.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "zokern/element.h"

#ifdef __CUDA_ARCH__
#define ZK_UNROLL4 _Pragma("unroll 4")
#else
#define ZK_UNROLL4
#endif

namespace zokern {

constexpr int kThreads = 256;
constexpr int kVec = 8;                              // elements per thread and step: two Philox calls
constexpr int64_t kDefaultChunk = int64_t(1) << 16;  // elements per chunk: 32 steps of a 256-thread block
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// One tensor of a launch. first: index of its first chunk among the launch's chunks (a prefix sum).
struct TensorEntry {
  void* data;
  void* aux;        // the companion, numel elements or mask words: Hessian D, anchor, bitmask (or null)
  const void* src;  // anchored_rescale's source: another tensor, or data itself
  int64_t numel;
  int64_t first;
  int64_t offset;  // the stream index of element 0: element l draws stream element offset + l
  uint32_t stream;
  int32_t index;  // position in the call's lists: thresholds, factors and norms are indexed by it
  float weight_decay;
};

// The last entry whose `first` (first chunk or tile of the entry) is <= c: the one that owns work item c.
template <class E>
__device__ inline const E& find_entry(const E* __restrict__ entries, int count, int64_t c) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (entries[mid].first <= c) lo = mid; else hi = mid - 1;
  }
  return entries[lo];
}

// kVec elements as 16-byte words.
template <class T>
union Pack {
  uint4 words[sizeof(T) * kVec / sizeof(uint4)];
  T e[kVec];
};

__device__ inline bool vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(uint4) == 0; }

// Elements g .. g+kVec-1 of p (g a multiple of kVec) as float32. full: all of them are in range and p is
// 16-byte aligned, so vector accesses; else element by element over [lo, hi), zeros elsewhere.
template <class T>
__device__ inline void load_vec(const T* p, int64_t g, int64_t lo, int64_t hi, bool full, float x[kVec]) {
  if (full) {
    Pack<T> pack;
    const uint4* src = reinterpret_cast<const uint4*>(p + g);
    ZK_UNROLL
    for (int k = 0; k < int(sizeof(pack.words) / sizeof(uint4)); ++k) pack.words[k] = src[k];
    ZK_UNROLL
    for (int e = 0; e < kVec; ++e) x[e] = to_float(pack.e[e]);
  } else {
    ZK_UNROLL
    for (int e = 0; e < kVec; ++e) x[e] = (g + e >= lo && g + e < hi) ? to_float(p[g + e]) : 0.f;
  }
}

// Stores to nearest even, or with stochastic rounding and the elements' rounding words r.
template <class T>
__device__ inline void store_vec(T* p, int64_t g, int64_t lo, int64_t hi, bool full, const float x[kVec],
                                 bool stochastic = false, const uint32_t r[kVec] = nullptr) {
  if (full) {
    Pack<T> pack;
    ZK_UNROLL
    for (int e = 0; e < kVec; ++e) pack.e[e] = from_float_rounded<T>(x[e], stochastic, stochastic ? r[e] : 0u);
    uint4* dst = reinterpret_cast<uint4*>(p + g);
    ZK_UNROLL
    for (int k = 0; k < int(sizeof(pack.words) / sizeof(uint4)); ++k) dst[k] = pack.words[k];
  } else {
    ZK_UNROLL
    for (int e = 0; e < kVec; ++e) {
      if (g + e >= lo && g + e < hi) p[g + e] = from_float_rounded<T>(x[e], stochastic, stochastic ? r[e] : 0u);
    }
  }
}

// The steps of a range: g runs over multiples of kVec of the tensor index (whole Philox calls) from the
// one holding `begin`; [lo, hi) is the part of g's kVec elements inside [begin, end).
struct Step {
  int64_t g, lo, hi;
};

template <class F>
__device__ inline void for_each_step(int64_t begin, int64_t end, F&& f) {
  const int64_t stride = int64_t(blockDim.x) * kVec;
  for (int64_t g = (begin & ~int64_t(kVec - 1)) + int64_t(threadIdx.x) * kVec; g < end; g += stride) {
    f(Step{g, g > begin ? g : begin, g + kVec < end ? g + kVec : end});
  }
}

// ---- the ranges: what a block does with elements [begin, end) of tensor t (chunk c of its launch) ----

// The ranges that work in whole Philox calls address a tensor through its pointer moved back by phase =
// offset mod 4 elements: element v = l + phase of the moved pointer is stream element 4·(offset >> 2) + v, so
// the steps over v in [begin + phase, end + phase) are whole calls again (only the edge steps are partial).
// The moved pointer is never dereferenced outside the tensor.
template <class T>
__device__ inline T* phase_moved(void* data, int64_t offset) {
  return static_cast<T*>(data) - (offset & 3);
}

// perturb / fused step: Op(stream, wd, j, x[4]) on the tensor alone.
template <class T, class Op>
struct MezoRange {
  Op op;

  __device__ void operator()(const TensorEntry& t, int64_t begin, int64_t end, int64_t /*c*/) const {
    T* p = phase_moved<T>(t.data, t.offset);
    const int64_t phase = t.offset & 3;
    const uint64_t call0 = static_cast<uint64_t>(t.offset) >> 2;
    const bool aligned = vector_aligned(p);
    for_each_step(begin + phase, end + phase, [&](const Step& s) {
      const bool full = aligned && s.lo == s.g && s.hi == s.g + kVec;
      const uint64_t j = call0 + (static_cast<uint64_t>(s.g) >> 2);
      float x[kVec];
      load_vec(p, s.g, s.lo, s.hi, full, x);
      op(t.stream, t.weight_decay, j, x);
      if (s.g + 4 < s.hi) op(t.stream, t.weight_decay, j + 1, x + 4);
      const bool stochastic = sizeof(T) == 2 && op.stochastic_store();
      uint32_t r[kVec];
      if (stochastic) rounding_words_at<kVec>(op.seed, t.stream, 4 * j, r);
      store_vec(p, s.g, s.lo, s.hi, full, x, stochastic, r);
    });
  }
};

// Masked perturb / fused step. Chunks are multiples of 32 elements, and so is the block's step, so the
// four lanes 4q .. 4q+3 of a warp hold the 4 bytes (8 elements each) of one mask word: each reads the
// word, two shuffles OR the bytes into the whole word, and lane 4q stores it. The loop runs the same
// steps on every lane (out-of-range lanes add nothing) so that the shuffles see the full warp.
template <class T, class Op>
struct SparseRange {
  Op op;
  const float* thresholds;

  __device__ void operator()(const TensorEntry& t, int64_t begin, int64_t end, int64_t /*c*/) const {
    T* p = static_cast<T*>(t.data);
    uint32_t* words = static_cast<uint32_t*>(t.aux);
    const float h = thresholds[t.index];
    const bool aligned = vector_aligned(p);
    const int lane = threadIdx.x & 31;
    for (int64_t g0 = begin; g0 < end; g0 += int64_t(blockDim.x) * kVec) {
      const int64_t g = g0 + int64_t(threadIdx.x) * kVec;
      uint32_t byte = 0;
      if (g < end) {
        const int64_t hi = g + kVec < end ? g + kVec : end;
        const bool full = aligned && hi == g + kVec;
        const uint64_t i = static_cast<uint64_t>(t.offset + g);  // stream element of element g
        const uint32_t in = op.reads_mask() ? (words[g >> 5] >> (g & 31)) & 0xFFu : 0u;
        float x[kVec];
        uint32_t r[kVec] = {};
        if (sizeof(T) == 2 && op.stochastic()) rounding_words_at<kVec>(op.seed, t.stream, i, r);
        load_vec(p, g, g, hi, full, x);
        byte = op.template apply<T>(t.stream, t.weight_decay, h, i, x, in & 0xFu, r);
        if (g + 4 < hi) byte |= op.template apply<T>(t.stream, t.weight_decay, h, i + 4, x + 4, in >> 4, r + 4) << 4;
        store_vec(p, g, g, hi, full, x, sizeof(T) == 2 && op.stochastic_store(), r);
        if (hi - g < kVec) byte &= (1u << (hi - g)) - 1u;  // the tensor's end: zero bits past it
      }
      uint32_t word = byte << (8 * (lane & 3));
      word |= __shfl_xor_sync(kFullWarp, word, 1);
      word |= __shfl_xor_sync(kFullWarp, word, 2);
      if (op.writes_mask() && g < end && (lane & 3) == 0) words[g >> 5] = word;
    }
  }
};

// Hessian perturb / step: Op(stream, wd, j, x[4], d[4]) on the tensor and its D (dtype TD).
template <class T, class TD, class Op>
struct HizooRange {
  Op op;

  __device__ void operator()(const TensorEntry& t, int64_t begin, int64_t end, int64_t /*c*/) const {
    T* p = phase_moved<T>(t.data, t.offset);
    TD* dh = phase_moved<TD>(t.aux, t.offset);
    const int64_t phase = t.offset & 3;
    const uint64_t call0 = static_cast<uint64_t>(t.offset) >> 2;
    const bool aligned = vector_aligned(p) && vector_aligned(dh);
    for_each_step(begin + phase, end + phase, [&](const Step& s) {
      const bool full = aligned && s.lo == s.g && s.hi == s.g + kVec;
      const uint64_t j = call0 + (static_cast<uint64_t>(s.g) >> 2);
      float x[kVec], d[kVec];
      load_vec(p, s.g, s.lo, s.hi, full, x);
      load_vec(dh, s.g, s.lo, s.hi, full, d);
      op(t.stream, t.weight_decay, j, x, d);
      if (s.g + 4 < s.hi) op(t.stream, t.weight_decay, j + 1, x + 4, d + 4);
      const bool stochastic = sizeof(T) == 2 && op.stochastic_store();
      uint32_t r[kVec];
      if (stochastic) rounding_words_at<kVec>(op.seed, t.stream, 4 * j, r);
      store_vec(p, s.g, s.lo, s.hi, full, x, stochastic, r);
      if (Op::writes_d) store_vec(dh, s.g, s.lo, s.hi, full, d);
    });
  }
};

// θ = a + (s − a)·f[t], s = the source (t.src, which may be θ itself); stored with stochastic rounding keyed by
// (seed, t.stream, t.offset + index) where `stochastic` (16-bit T).
template <class T>
struct DizoRescaleRange {
  const float* factors;
  uint64_t seed;
  bool stochastic;

  __device__ void operator()(const TensorEntry& t, int64_t begin, int64_t end, int64_t /*c*/) const {
    T* p = static_cast<T*>(t.data);
    const T* a = static_cast<const T*>(t.aux);
    const T* src = static_cast<const T*>(t.src);
    const float f = factors[t.index];
    const bool aligned = vector_aligned(p) && vector_aligned(a) && vector_aligned(src);
    for_each_step(begin, end, [&](const Step& s) {
      const bool full = aligned && s.lo == s.g && s.hi == s.g + kVec;
      float x[kVec], y[kVec];
      load_vec(a, s.g, s.lo, s.hi, full, y);
      load_vec(src, s.g, s.lo, s.hi, full, x);
      ZK_UNROLL
      for (int e = 0; e < kVec; ++e) x[e] = dizo_rescale_value(y[e], x[e], f);
      const bool rounds = sizeof(T) == 2 && stochastic;
      uint32_t r[kVec];
      if (rounds) rounding_words_at<kVec>(seed, t.stream, static_cast<uint64_t>(t.offset + s.g), r);
      store_vec(p, s.g, s.lo, s.hi, full, x, rounds, r);
    });
  }
};

// Σ (θ − θ0)² over the chunk into partials[c]: each thread sums its elements in order, then a fixed tree
// (shuffles within warps, then the warp sums by warp 0). Deterministic for a given chunk size; no atomics.
template <class T>
struct DizoNormRange {
  float* partials;

  __device__ void operator()(const TensorEntry& t, int64_t begin, int64_t end, int64_t c) const {
    __shared__ float warp_sums[kThreads / 32];
    const T* p = static_cast<const T*>(t.data);
    const T* a = static_cast<const T*>(t.aux);
    const bool aligned = vector_aligned(p) && vector_aligned(a);
    float acc = 0.f;
    for_each_step(begin, end, [&](const Step& s) {
      const bool full = aligned && s.lo == s.g && s.hi == s.g + kVec;
      float x[kVec], y[kVec];
      load_vec(p, s.g, s.lo, s.hi, full, x);
      load_vec(a, s.g, s.lo, s.hi, full, y);  // out of range: both 0, adding +0
      ZK_UNROLL
      for (int e = 0; e < kVec; ++e) acc = add_rn(acc, square_diff(x[e], y[e]));
    });
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    ZK_UNROLL
    for (int off = 16; off > 0; off >>= 1) acc = add_rn(acc, __shfl_down_sync(kFullWarp, acc, off));
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      acc = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
      ZK_UNROLL
      for (int off = 16; off > 0; off >>= 1) acc = add_rn(acc, __shfl_down_sync(kFullWarp, acc, off));
      if (lane == 0) partials[c] = acc;
    }
    __syncthreads();  // warp_sums is reused by the block's next chunk
  }
};

template <class Range>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorEntry* __restrict__ tensors, int num_tensors, int64_t num_chunks,
                        int64_t chunk, Range range) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const TensorEntry t = find_entry(tensors, num_tensors, c);
    const int64_t begin = (c - t.first) * chunk;
    range(t, begin, begin + chunk < t.numel ? begin + chunk : t.numel, c);
  }
}

// One tensor's sum of its chunk partials [first, first + count), in chunk order, and the square root.
struct DizoNormEntry {
  int64_t first, count, index;
};

static __global__ void __launch_bounds__(kThreads)
    norm_finish_kernel(const DizoNormEntry* __restrict__ entries, int num_tensors, const float* __restrict__ partials,
                       float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= num_tensors) return;
  const DizoNormEntry e = entries[t];
  float sum = 0.f;
  for (int64_t c = 0; c < e.count; ++c) sum = add_rn(sum, partials[e.first + c]);
  out[e.index] = sqrt_rn(sum);
}

// ---- low-rank: W += (U·C)·Vᵀ (sums in the order element.h fixes) ----

// One matrix of a launch. first: its first work item (U·C block, or W tile) in the launch.
struct SubzeroEntry {
  void* w;            // m×n, dtype T
  const void* u;      // m×r, dtype F
  const void* v;      // n×r, dtype F
  const float* core;  // r×r
  float* uc;          // m×r float32 scratch for U·C
  int64_t m, n, r;
  int64_t first;
  int64_t tiles_n;  // tiles per row band of W
  uint32_t stream;  // rounding key: W[i, j] is stream element offset + i·n + j
  int64_t offset;
};

constexpr int kUcPerBlock = kThreads * 4;  // U·C entries per work item
constexpr int kTileM = 64, kTileN = 64;    // W tile; thread (ty, tx) has rows ty + 16k and columns 4tx .. 4tx+3
constexpr int kSlice = 32;                 // rank slice staged in shared memory at a time: any r works

// U·C of every matrix: one thread per entry (i, a), summing over b in order. O(m·r²), small beside the tiles.
template <class F>
__global__ void __launch_bounds__(kThreads)
    subzero_uc_kernel(const SubzeroEntry* __restrict__ entries, int count, int64_t num_items) {
  for (int64_t c = blockIdx.x; c < num_items; c += gridDim.x) {
    const SubzeroEntry t = find_entry(entries, count, c);
    const F* u = static_cast<const F*>(t.u);
    const int64_t begin = (c - t.first) * kUcPerBlock, total = t.m * t.r;
    const int64_t end = begin + kUcPerBlock < total ? begin + kUcPerBlock : total;
    for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) {
      const int64_t i = k / t.r, a = k % t.r;
      float acc = 0.f;
      for (int64_t b = 0; b < t.r; ++b) acc = fma_rn(acc, to_float(u[i * t.r + b]), t.core[b * t.r + a]);
      t.uc[k] = acc;
    }
  }
}

// Four consecutive elements of W as one access (16 bytes for float32, 8 for bf16/fp16).
template <class T>
union Quad {
  typename std::conditional<sizeof(T) == 4, uint4, uint2>::type word;
  T e[4];
};

// W tiles of every matrix: per rank slice, U·C (kTileM × kSlice) and V (kTileN × kSlice, as float32) are
// staged in shared memory, transposed so the inner loop reads one broadcast U·C value per row and one
// float4 of V per thread; 16 accumulators per thread run over the whole rank, then W is read, added to
// and stored once. The m×n product never exists.
template <class T, class F>
__global__ void __launch_bounds__(kThreads)
    subzero_tile_kernel(const SubzeroEntry* __restrict__ entries, int count, int64_t num_tiles, uint64_t seed,
                        bool stochastic) {
  __shared__ float s_uc[kSlice][kTileM + 1];               // +1: conflict-free transposing stores
  __shared__ __align__(16) float s_v[kSlice][kTileN + 4];  // +4 keeps rows 16-byte aligned for float4
  const int tx = threadIdx.x % (kTileN / 4), ty = threadIdx.x / (kTileN / 4);
  constexpr int kRowStep = kThreads / (kTileN / 4);  // 16
  for (int64_t c = blockIdx.x; c < num_tiles; c += gridDim.x) {
    const SubzeroEntry t = find_entry(entries, count, c);
    const F* v = static_cast<const F*>(t.v);
    const int64_t local = c - t.first;
    const int64_t row0 = (local / t.tiles_n) * kTileM, col0 = (local % t.tiles_n) * kTileN;
    // A bfloat16 W sums lowrank_operand values in element.h's blocks (a slice is one): per slice, the even rank
    // indices into acc and the odd ones into odd, then acc = sum + (acc + odd) with sum the earlier slices'.
    constexpr bool kBlocks = std::is_same<T, bf16>::value;
    static_assert(!kBlocks || kSlice == kLowrankBlock, "a slice is a rank block");
    float acc[4][4] = {}, odd[4][4] = {}, sum[4][4] = {};
    for (int64_t a0 = 0; a0 < t.r; a0 += kSlice) {
      __syncthreads();  // the previous slice (or tile) is consumed
      for (int s = threadIdx.x; s < kSlice * kTileM; s += kThreads) {
        const int a = s % kSlice, i = s / kSlice;  // consecutive threads: consecutive a, coalesced reads
        const int64_t row = row0 + i;
        const float x = row < t.m && a0 + a < t.r ? t.uc[row * t.r + a0 + a] : 0.f;
        s_uc[a][i] = kBlocks ? lowrank_operand(x) : x;
      }
      for (int s = threadIdx.x; s < kSlice * kTileN; s += kThreads) {
        const int a = s % kSlice, j = s / kSlice;
        const int64_t col = col0 + j;
        const float x = col < t.n && a0 + a < t.r ? to_float(v[col * t.r + a0 + a]) : 0.f;
        s_v[a][j] = kBlocks ? lowrank_operand(x) : x;
      }
      __syncthreads();
      const int rs = t.r - a0 < kSlice ? static_cast<int>(t.r - a0) : kSlice;
      const auto accumulate = [&](float(&into)[4][4], int a) {
        const float4 vq = *reinterpret_cast<const float4*>(&s_v[a][4 * tx]);
        ZK_UNROLL
        for (int k = 0; k < 4; ++k) {
          const float ua = s_uc[a][ty + kRowStep * k];
          into[k][0] = fma_rn(into[k][0], ua, vq.x);
          into[k][1] = fma_rn(into[k][1], ua, vq.y);
          into[k][2] = fma_rn(into[k][2], ua, vq.z);
          into[k][3] = fma_rn(into[k][3], ua, vq.w);
        }
      };
      ZK_UNROLL4
      for (int a = 0; a < rs; a += kBlocks ? 2 : 1) {
        accumulate(acc, a);
        if (kBlocks && a + 1 < rs) accumulate(odd, a + 1);
      }
      if (kBlocks) {
        ZK_UNROLL
        for (int k = 0; k < 4; ++k) {
          ZK_UNROLL
          for (int e = 0; e < 4; ++e) {
            sum[k][e] = add_rn(sum[k][e], add_rn(acc[k][e], odd[k][e]));
            acc[k][e] = odd[k][e] = 0.f;
          }
        }
      }
    }
    if (kBlocks) {
      ZK_UNROLL
      for (int k = 0; k < 4; ++k) {
        ZK_UNROLL
        for (int e = 0; e < 4; ++e) acc[k][e] = sum[k][e];
      }
    }
    T* w = static_cast<T*>(t.w);
    const int64_t col = col0 + 4 * tx;
    ZK_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int64_t row = row0 + ty + kRowStep * k;
      if (row >= t.m || col >= t.n) continue;
      T* wp = w + row * t.n + col;
      const bool rounds = sizeof(T) == 2 && stochastic;
      uint32_t r[4] = {};
      if (rounds) rounding_words_at<4>(seed, t.stream, static_cast<uint64_t>(t.offset + row * t.n + col), r);
      if (col + 4 <= t.n && reinterpret_cast<uintptr_t>(wp) % sizeof(Quad<T>) == 0) {
        Quad<T> q;
        q.word = *reinterpret_cast<const decltype(q.word)*>(wp);
        ZK_UNROLL
        for (int e = 0; e < 4; ++e) q.e[e] = from_float_rounded<T>(add_rn(to_float(q.e[e]), acc[k][e]), rounds, r[e]);
        *reinterpret_cast<decltype(q.word)*>(wp) = q.word;
      } else {
        ZK_UNROLL
        for (int e = 0; e < 4; ++e) {
          if (col + e < t.n) wp[e] = from_float_rounded<T>(add_rn(to_float(wp[e]), acc[k][e]), rounds, r[e]);
        }
      }
    }
  }
}

// Stream positions offset .. offset+n-1 into out[0 .. n-1]; one Philox call per thread and step.
static __global__ void __launch_bounds__(kThreads)
    fill_kernel(float* __restrict__ out, int64_t n, int64_t offset, uint64_t seed, uint32_t stream,
                uint32_t domain, int dist) {
  const int64_t last = (offset + n - 1) >> 2;
  for (int64_t j = (offset >> 2) + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j <= last;
       j += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    draw4(seed, stream, domain, dist, static_cast<uint64_t>(j), z);
    const int64_t lo = 4 * j > offset ? 4 * j : offset, hi = 4 * j + 4 < offset + n ? 4 * j + 4 : offset + n;
    float* o = out + (lo - offset);
    if (hi - lo == 4 && reinterpret_cast<uintptr_t>(o) % sizeof(float4) == 0) {
      *reinterpret_cast<float4*>(o) = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      ZK_UNROLL
      for (int q = 0; q < 4; ++q) {  // static indices keep z in registers
        if (4 * j + q >= lo && 4 * j + q < hi) out[4 * j + q - offset] = z[q];
      }
    }
  }
}

static __global__ void __launch_bounds__(kThreads)
    philox_words_kernel(int64_t* __restrict__ out, int64_t n, uint64_t seed, uint32_t stream, uint32_t domain,
                        uint64_t first_call) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const Words w = philox(seed, stream, domain, first_call + static_cast<uint64_t>(k));
    ZK_UNROLL
    for (int q = 0; q < 4; ++q) out[4 * k + q] = w.w[q];
  }
}

inline unsigned grid_for(int64_t work_items, int max_blocks) {
  return static_cast<unsigned>(work_items < max_blocks ? work_items : max_blocks);
}

// Launchers: max_blocks caps the (grid-stride) grid, e.g. one wave of resident blocks. Each launches
// exactly one kernel on `stream`; the caller checks cudaGetLastError. Nothing is launched for no work.
template <class Range>
void launch_multi_tensor(const TensorEntry* tensors, int num_tensors, int64_t num_chunks, int64_t chunk,
                         const Range& range, int max_blocks, cudaStream_t stream) {
  if (num_chunks == 0) return;
  multi_tensor_kernel<Range><<<grid_for(num_chunks, max_blocks), kThreads, 0, stream>>>(
      tensors, num_tensors, num_chunks, chunk, range);
}

inline void launch_norm_finish(const DizoNormEntry* entries, int num_tensors, const float* partials, float* out,
                               cudaStream_t stream) {
  if (num_tensors == 0) return;
  norm_finish_kernel<<<(num_tensors + kThreads - 1) / kThreads, kThreads, 0, stream>>>(entries, num_tensors,
                                                                                        partials, out);
}

template <class F>
void launch_subzero_uc(const SubzeroEntry* entries, int count, int64_t num_items, int max_blocks,
                       cudaStream_t stream) {
  if (num_items == 0) return;
  subzero_uc_kernel<F><<<grid_for(num_items, max_blocks), kThreads, 0, stream>>>(entries, count, num_items);
}

template <class T, class F>
void launch_subzero_tiles(const SubzeroEntry* entries, int count, int64_t num_tiles, uint64_t seed, bool stochastic,
                          int max_blocks, cudaStream_t stream) {
  if (num_tiles == 0) return;
  subzero_tile_kernel<T, F><<<grid_for(num_tiles, max_blocks), kThreads, 0, stream>>>(entries, count, num_tiles,
                                                                                       seed, stochastic);
}

inline void launch_fill(float* out, int64_t n, int64_t offset, uint64_t seed, uint32_t stream_id, uint32_t domain,
                        int dist, int max_blocks, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t calls = ((offset + n - 1) >> 2) - (offset >> 2) + 1;
  fill_kernel<<<grid_for((calls + kThreads - 1) / kThreads, max_blocks), kThreads, 0, stream>>>(
      out, n, offset, seed, stream_id, domain, dist);
}

inline void launch_philox_words(int64_t* out, int64_t n, uint64_t seed, uint32_t stream_id, uint32_t domain,
                                uint64_t first_call, int max_blocks, cudaStream_t stream) {
  if (n == 0) return;
  philox_words_kernel<<<grid_for((n + kThreads - 1) / kThreads, max_blocks), kThreads, 0, stream>>>(
      out, n, seed, stream_id, domain, first_call);
}

}  // namespace zokern
