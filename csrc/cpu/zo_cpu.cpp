// CPU ops of zokern (namespace zokern_cpp): a whole list of tensors per call, OpenMP-parallel over a table
// of chunks that covers all of them. The math is csrc/include/zokern/{philox,element}.h, shared with CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "zokern/element.h"

namespace {

using namespace zokern;

constexpr int64_t kDefaultChunk = int64_t(1) << 16;

// Calls f(j, lo, hi) for every Philox call j touching elements [begin, end), with [lo, hi) the elements
// of that call inside the range.
template <class F>
inline void for_each_call(int64_t begin, int64_t end, F&& f) {
  for (int64_t j = begin >> 2; (j << 2) < end; ++j) f(j, std::max(begin, j << 2), std::min(end, (j << 2) + 4));
}

template <class T, class Op>
void apply_range(void* data, int64_t begin, int64_t end, uint32_t stream, float wd, const Op& op) {
  T* p = static_cast<T*>(data);
  for_each_call(begin, end, [&](int64_t j, int64_t lo, int64_t hi) {
    float x[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = lo; i < hi; ++i) x[i & 3] = to_float(p[i]);
    op(stream, wd, static_cast<uint64_t>(j), x);
    for (int64_t i = lo; i < hi; ++i) p[i] = from_float<T>(x[i & 3]);
  });
}

struct Slot {
  void* data;
  at::ScalarType dtype;
  uint32_t stream;
  float wd;
};

struct Chunk {
  int64_t slot, begin, end;
};

// Applies op to every element of every tensor, parallel over chunks of `chunk` elements.
template <class Op>
void apply_all(const at::TensorList params, at::IntArrayRef streams, const std::vector<float>& wds,
               int64_t chunk, const Op& op) {
  TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cpp: list lengths differ");
  chunk = chunk > 0 ? chunk : kDefaultChunk;
  std::vector<Slot> slots;
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "zokern_cpp: params must be contiguous CPU tensors");
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "zokern_cpp: params must be float32, bfloat16 or float16");
    const int64_t n = p.numel();
    if (n == 0) continue;
    const int64_t slot = static_cast<int64_t>(slots.size());
    slots.push_back({p.data_ptr(), dtype, static_cast<uint32_t>(streams[t]), wds[t]});
    for (int64_t b = 0; b < n; b += chunk) chunks.push_back({slot, b, std::min(n, b + chunk)});
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const Slot& s = slots[ch.slot];
    switch (s.dtype) {
      case at::kFloat: apply_range<float>(s.data, ch.begin, ch.end, s.stream, s.wd, op); break;
      case at::kBFloat16: apply_range<bf16>(s.data, ch.begin, ch.end, s.stream, s.wd, op); break;
      default: apply_range<f16>(s.data, ch.begin, ch.end, s.stream, s.wd, op); break;
    }
  }
}

void perturb_(at::TensorList params, at::IntArrayRef streams, int64_t seed, double scale, int64_t dist,
              int64_t chunk) {
  const PerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist)};
  apply_all(params, streams, std::vector<float>(params.size(), 0.f), chunk, op);
}

void fused_step_(at::TensorList params, at::IntArrayRef streams, int64_t seed, double restore, double lr,
                 double grad, at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale,
                 int64_t dist, int64_t chunk) {
  const StepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                  static_cast<float>(grad), next_seed, static_cast<float>(next_scale), static_cast<int>(dist)};
  apply_all(params, streams, std::vector<float>(weight_decays.begin(), weight_decays.end()), chunk, op);
}

void fill_random_(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset, int64_t domain, int64_t dist) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "zokern_cpp: out must be a contiguous float32 CPU tensor");
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel();
  const int64_t num_chunks = (n + kDefaultChunk - 1) / kDefaultChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < num_chunks; ++c) {
    // Stream positions offset + [begin, end) go to out[begin, end).
    const int64_t begin = offset + c * kDefaultChunk, end = offset + std::min(n, (c + 1) * kDefaultChunk);
    for_each_call(begin, end, [&](int64_t j, int64_t lo, int64_t hi) {
      float z[4];
      draw4(static_cast<uint64_t>(seed), static_cast<uint32_t>(stream), static_cast<uint32_t>(domain),
            static_cast<int>(dist), static_cast<uint64_t>(j), z);
      for (int64_t i = lo; i < hi; ++i) o[i - offset] = z[i & 3];
    });
  }
}

at::Tensor philox_words(int64_t seed, int64_t stream, int64_t domain, int64_t first_call, int64_t n,
                        c10::Device device) {
  TORCH_CHECK(device.is_cpu(), "zokern_cpp.philox_words runs on the CPU, got ", device);
  at::Tensor out = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k) {
    const Words w = philox(static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
                           static_cast<uint32_t>(domain), static_cast<uint64_t>(first_call + k));
    for (int q = 0; q < 4; ++q) o[4 * k + q] = w.w[q];
  }
  return out;
}

}  // namespace

// philox_words has no tensor argument to dispatch on, so it is a catch-all kernel; the others are CPU
// kernels, and a tensor of another device is a dispatcher error. chunk <= 0: the default chunk size.
TORCH_LIBRARY(zokern_cpp, m) {
  m.def("philox_words(int seed, int stream, int domain, int first_call, int n, Device device) -> Tensor",
        &philox_words);
  m.def("fill_random_(Tensor(a!) out, int seed, int stream, int offset, int domain, int dist) -> ()");
  m.def("perturb_(Tensor(a!)[] params, int[] streams, int seed, float scale, int dist, int chunk) -> ()");
  m.def("fused_step_(Tensor(a!)[] params, int[] streams, int seed, float restore, float lr, float grad, "
        "float[] weight_decays, int next_seed, float next_scale, int dist, int chunk) -> ()");
}

TORCH_LIBRARY_IMPL(zokern_cpp, CPU, m) {
  m.impl("fill_random_", &fill_random_);
  m.impl("perturb_", &perturb_);
  m.impl("fused_step_", &fused_step_);
}
