// Torch-free CUDA kernels of zokern. The fused ops are multi-tensor applies (apex multi_tensor_apply
// style): one launch per dtype over a device table of tensors, each cut into chunks of `chunk` elements.
// A block takes a chunk (grid-stride over all chunks of the launch, persistent grid), finds its tensor by
// binary search over the table's chunk prefix, and each thread handles 8 consecutive elements per step,
// i.e. two whole Philox calls: one 16-byte access for bf16/fp16, two for float32. Element indices are
// 64-bit. The per-element math lives in zokern/element.h, shared with the CPU build.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "zokern/element.h"

namespace zokern {

constexpr int kThreads = 256;
constexpr int kVec = 8;                              // elements per thread and step: two Philox calls
constexpr int64_t kDefaultChunk = int64_t(1) << 16;  // elements per chunk: 32 steps of a 256-thread block

// One tensor of a launch. first_chunk: index of its first chunk among the launch's chunks (a prefix sum).
struct TensorEntry {
  void* data;
  int64_t numel;
  int64_t first_chunk;
  uint32_t stream;
  float weight_decay;
};

// kVec elements as 16-byte words.
template <class T>
union Pack {
  uint4 words[sizeof(T) * kVec / sizeof(uint4)];
  T e[kVec];
};

// Applies op to elements [begin, end) of tensor t. Steps are aligned to multiples of kVec of the tensor
// index, so a step is whole Philox calls; full steps on a 16-byte aligned tensor use vector accesses, the
// rest (ragged chunk edges, tails, misaligned views) goes element by element.
template <class T, class Op>
__device__ void apply_range(const TensorEntry& t, int64_t begin, int64_t end, const Op& op) {
  T* p = static_cast<T*>(t.data);
  const bool vector_ok = reinterpret_cast<uintptr_t>(p) % sizeof(uint4) == 0;
  const int64_t stride = int64_t(blockDim.x) * kVec;
  for (int64_t g = (begin & ~int64_t(kVec - 1)) + int64_t(threadIdx.x) * kVec; g < end; g += stride) {
    const uint64_t j = static_cast<uint64_t>(g) >> 2;
    float x[kVec];
    if (vector_ok && g >= begin && g + kVec <= end) {
      Pack<T> pack;
      const uint4* src = reinterpret_cast<const uint4*>(p + g);
      ZK_UNROLL
      for (int k = 0; k < int(sizeof(pack.words) / sizeof(uint4)); ++k) pack.words[k] = src[k];
      ZK_UNROLL
      for (int e = 0; e < kVec; ++e) x[e] = to_float(pack.e[e]);
      op(t.stream, t.weight_decay, j, x);
      op(t.stream, t.weight_decay, j + 1, x + 4);
      ZK_UNROLL
      for (int e = 0; e < kVec; ++e) pack.e[e] = from_float<T>(x[e]);
      uint4* dst = reinterpret_cast<uint4*>(p + g);
      ZK_UNROLL
      for (int k = 0; k < int(sizeof(pack.words) / sizeof(uint4)); ++k) dst[k] = pack.words[k];
    } else {
      const int64_t lo = g > begin ? g : begin, hi = g + kVec < end ? g + kVec : end;
      ZK_UNROLL
      for (int e = 0; e < kVec; ++e) x[e] = (g + e >= lo && g + e < hi) ? to_float(p[g + e]) : 0.f;
      op(t.stream, t.weight_decay, j, x);
      if (g + 4 < hi) op(t.stream, t.weight_decay, j + 1, x + 4);
      ZK_UNROLL
      for (int e = 0; e < kVec; ++e) {
        if (g + e >= lo && g + e < hi) p[g + e] = from_float<T>(x[e]);
      }
    }
  }
}

template <class T, class Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorEntry* __restrict__ tensors, int num_tensors, int64_t num_chunks,
                        int64_t chunk, Op op) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    int lo = 0, hi = num_tensors - 1;  // the last tensor whose first chunk is <= c
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tensors[mid].first_chunk <= c) lo = mid; else hi = mid - 1;
    }
    const TensorEntry t = tensors[lo];
    const int64_t begin = (c - t.first_chunk) * chunk;
    apply_range<T>(t, begin, begin + chunk < t.numel ? begin + chunk : t.numel, op);
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
template <class T, class Op>
void launch_multi_tensor(const TensorEntry* tensors, int num_tensors, int64_t num_chunks, int64_t chunk,
                         const Op& op, int max_blocks, cudaStream_t stream) {
  if (num_chunks == 0) return;
  multi_tensor_kernel<T, Op><<<grid_for(num_chunks, max_blocks), kThreads, 0, stream>>>(
      tensors, num_tensors, num_chunks, chunk, op);
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
