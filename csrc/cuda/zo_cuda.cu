// CUDA ops of zokern (namespace zokern_cuda), same schemas as zokern_cpp: builds the per-dtype tensor
// tables of a call, copies them to the device in one small H2D copy and launches one multi-tensor kernel
// per dtype present, all on the current stream. The kernels are in zo_kernels.cuh.
// c10/cuda only (not ATen/cuda/CUDAContext.h, which drags in the cuBLAS/cuSPARSE/cuSOLVER headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "zo_kernels.cuh"

namespace {

using namespace zokern;

// One wave of resident blocks on the current device: the grid-stride kernels cover any work with it.
int max_blocks() {
  int device = 0, sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return sms * (threads_per_sm / kThreads);
}

constexpr at::ScalarType kGroupTypes[] = {at::kFloat, at::kBFloat16, at::kHalf};
constexpr int kGroups = 3;

template <class Op>
void apply_all(at::TensorList params, at::IntArrayRef streams, const std::vector<float>& wds, int64_t chunk,
               const Op& op) {
  TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cuda: list lengths differ");
  if (params.empty()) return;
  chunk = chunk > 0 ? chunk : kDefaultChunk;
  const at::Device device = params[0].device();
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.device() == device && p.is_contiguous(),
                "zokern_cuda: params must be contiguous tensors on one CUDA device");
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "zokern_cuda: params must be float32, bfloat16 or float16");
  }
  const c10::cuda::CUDAGuard guard(device);

  // The tables of all dtype groups, back to back; group g is entries [first[g], first[g + 1]).
  std::vector<TensorEntry> table;
  size_t first[kGroups + 1];
  int64_t num_chunks[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    first[g] = table.size();
    num_chunks[g] = 0;
    for (size_t t = 0; t < params.size(); ++t) {
      const at::Tensor& p = params[t];
      if (p.scalar_type() != kGroupTypes[g] || p.numel() == 0) continue;
      table.push_back({p.data_ptr(), p.numel(), num_chunks[g], static_cast<uint32_t>(streams[t]), wds[t]});
      num_chunks[g] += (p.numel() + chunk - 1) / chunk;
    }
  }
  first[kGroups] = table.size();
  if (table.empty()) return;

  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(TensorEntry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), bytes);
  // Asynchronous on the current stream; the pinned block is not reused before the copy is done, and the
  // device block is freed only to the caching allocator, stream-ordered after the kernels.
  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  const auto* d_table = reinterpret_cast<const TensorEntry*>(dev.data_ptr());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = max_blocks();
  for (int g = 0; g < kGroups; ++g) {
    const int count = static_cast<int>(first[g + 1] - first[g]);
    if (count == 0) continue;
    const TensorEntry* d = d_table + first[g];
    switch (kGroupTypes[g]) {
      case at::kFloat: launch_multi_tensor<float>(d, count, num_chunks[g], chunk, op, blocks, stream); break;
      case at::kBFloat16: launch_multi_tensor<bf16>(d, count, num_chunks[g], chunk, op, blocks, stream); break;
      default: launch_multi_tensor<f16>(d, count, num_chunks[g], chunk, op, blocks, stream); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "zokern_cuda: out must be a contiguous float32 CUDA tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  launch_fill(out.data_ptr<float>(), out.numel(), offset, static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
              static_cast<uint32_t>(domain), static_cast<int>(dist), max_blocks(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor philox_words(int64_t seed, int64_t stream, int64_t domain, int64_t first_call, int64_t n,
                        c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "zokern_cuda.philox_words runs on a CUDA device, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong).device(device));
  launch_philox_words(out.data_ptr<int64_t>(), n, static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
                      static_cast<uint32_t>(domain), static_cast<uint64_t>(first_call), max_blocks(),
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// As in zokern_cpp: philox_words (no tensor argument) is a catch-all kernel, the others CUDA kernels.
TORCH_LIBRARY(zokern_cuda, m) {
  m.def("philox_words(int seed, int stream, int domain, int first_call, int n, Device device) -> Tensor",
        &philox_words);
  m.def("fill_random_(Tensor(a!) out, int seed, int stream, int offset, int domain, int dist) -> ()");
  m.def("perturb_(Tensor(a!)[] params, int[] streams, int seed, float scale, int dist, int chunk) -> ()");
  m.def("fused_step_(Tensor(a!)[] params, int[] streams, int seed, float restore, float lr, float grad, "
        "float[] weight_decays, int next_seed, float next_scale, int dist, int chunk) -> ()");
}

TORCH_LIBRARY_IMPL(zokern_cuda, CUDA, m) {
  m.impl("fill_random_", &fill_random_);
  m.impl("perturb_", &perturb_);
  m.impl("fused_step_", &fused_step_);
}
