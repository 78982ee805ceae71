// CUDA kernels of zokern's ops (zokern::native_*, CUDA dispatch key), as the CPU ones: builds the per-group
// tensor tables of a call (a group: the tensors of one dtype, or dtype pair), copies them to the device in one
// small H2D copy and launches one kernel per group present, all on the current stream. Per-tensor scalars
// that live on the device (thresholds, factors) are read in the kernels: no host synchronisation. The
// kernels are in zo_kernels.cuh.
// c10/cuda only (not ATen/cuda/CUDAContext.h, which drags in the cuBLAS/cuSPARSE/cuSOLVER headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "zokern/backend_ops.h"
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

constexpr int kDtypes = 3;  // float32, bfloat16, float16: the group index of a dtype

int dtype_index(at::ScalarType dtype) { return dtype == at::kFloat ? 0 : dtype == at::kBFloat16 ? 1 : 2; }

// Calls f with a value of the storage type of dtype index i.
template <class F>
void dispatch(int i, F&& f) {
  switch (i) {
    case 0: f(float{}); break;
    case 1: f(bf16{}); break;
    default: f(f16{}); break;
  }
}

void check_floats(at::TensorList tensors, const at::Device& device, const char* what) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device() == device && t.is_contiguous(), "zokern_cuda: ", what,
                " must be contiguous tensors on one CUDA device");
    const auto dtype = t.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "zokern_cuda: ", what,
                " must be float32, bfloat16 or float16");
  }
}

// Companions (Hessians, anchors, sources) go with params one to one, numel(p) elements each.
void check_companions(at::TensorList params, at::TensorList others, const at::Device& device, const char* what) {
  TORCH_CHECK(others.size() == params.size(), "zokern_cuda: one ", what, " per tensor");
  check_floats(others, device, what);
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(others[t].numel() == params[t].numel(), "zokern_cuda: ", what, " must match their tensors' sizes");
  }
}

const float* per_tensor(const at::Tensor& values, size_t count, const at::Device& device, const char* what) {
  TORCH_CHECK(values.device() == device && values.is_contiguous() && values.scalar_type() == at::kFloat &&
                  values.numel() == static_cast<int64_t>(count),
              "zokern_cuda: ", what, " must be a contiguous float32 tensor on the tensors' device, one per tensor");
  return values.data_ptr<float>();
}

// Host tables gathered into one buffer and copied to the device in one asynchronous H2D copy on the
// current stream. The pinned block is not reused before the copy is done, and the device block is freed
// only to the caching allocator, stream-ordered after the kernels that read it.
class Upload {
 public:
  template <class E>
  size_t add(const std::vector<E>& items) {
    const size_t offset = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(offset + items.size() * sizeof(E));
    if (!items.empty()) std::memcpy(bytes_.data() + offset, items.data(), items.size() * sizeof(E));
    return offset;
  }

  // The device copy; keep it alive while the launches are made.
  at::Tensor to(const at::Device& device) const {
    const int64_t n = static_cast<int64_t>(bytes_.size());
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes_.data(), bytes_.size());
    at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
    dev.copy_(host, /*non_blocking=*/true);
    return dev;
  }

 private:
  std::vector<unsigned char> bytes_;
};

template <class E>
const E* at_offset(const at::Tensor& dev, size_t offset) {
  return reinterpret_cast<const E*>(static_cast<const unsigned char*>(dev.data_ptr()) + offset);
}

// The tensors of a call sorted into launch groups: group g is table[first[g], first[g + 1]) with chunks[g]
// chunks; each entry's `first` is its first chunk in its group. Empty tensors are left out.
struct Groups {
  std::vector<TensorEntry> table;
  std::vector<size_t> first;
  std::vector<int64_t> chunks;
};

Groups make_groups(const std::vector<TensorEntry>& entries, const std::vector<int>& group, int num_groups,
                   int64_t chunk) {
  Groups out;
  for (int g = 0; g < num_groups; ++g) {
    out.first.push_back(out.table.size());
    out.chunks.push_back(0);
    for (size_t t = 0; t < entries.size(); ++t) {
      if (group[t] != g || entries[t].numel == 0) continue;
      out.table.push_back(entries[t]);
      out.table.back().first = out.chunks[g];
      out.chunks[g] += (entries[t].numel + chunk - 1) / chunk;
    }
  }
  out.first.push_back(out.table.size());
  return out;
}

// Calls launch(g, device table, count, chunks) for every non-empty group, checking each launch.
template <class Launch>
void launch_groups(const Groups& groups, const TensorEntry* d_table, Launch&& launch) {
  for (size_t g = 0; g + 1 < groups.first.size(); ++g) {
    const int count = static_cast<int>(groups.first[g + 1] - groups.first[g]);
    if (count == 0) continue;
    launch(static_cast<int>(g), d_table + groups.first[g], count, groups.chunks[g]);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Sorts the entries into launch groups, copies their table to the device and calls
// launch(g, device table, count, chunks, blocks, stream) for every non-empty group, on the current stream.
template <class Launch>
void launch_grouped(const std::vector<TensorEntry>& entries, const std::vector<int>& group, int num_groups,
                    int64_t chunk, const at::Device& device, Launch&& launch) {
  const Groups groups = make_groups(entries, group, num_groups, chunk);
  if (groups.table.empty()) return;
  Upload up;
  const size_t offset = up.add(groups.table);
  const at::Tensor dev = up.to(device);  // alive until the launches are made
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = max_blocks();
  launch_groups(groups, at_offset<TensorEntry>(dev, offset), [&](int g, const TensorEntry* d, int count, int64_t n) {
    launch(g, d, count, n, blocks, stream);
  });
}

TensorEntry entry(const at::Tensor& p, size_t index, uint32_t stream = 0, float wd = 0.f, void* aux = nullptr,
                  const void* src = nullptr, int64_t offset = 0) {
  return TensorEntry{p.data_ptr(), aux, src, p.numel(), 0, offset, stream, static_cast<int32_t>(index), wd};
}

int64_t chunk_or_default(int64_t chunk, int64_t align = 1) {
  chunk = chunk > 0 ? chunk : kDefaultChunk;
  return (chunk + align - 1) / align * align;
}

// ---- the element-wise ops' loops (backend_ops.h turns the schemas' scalars into their Ops) ----

struct Loops {
  template <class Op>
  static void mezo_all(at::TensorList params, at::IntArrayRef streams, const std::vector<int64_t>& offsets,
                        const std::vector<float>& wds, int64_t chunk, const Op& op) {
    TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cuda: list lengths differ");
    if (params.empty()) return;
    const at::Device device = params[0].device();
    check_floats(params, device, "params");
    const c10::cuda::CUDAGuard guard(device);
    chunk = chunk_or_default(chunk);
    std::vector<TensorEntry> entries;
    std::vector<int> group;
    for (size_t t = 0; t < params.size(); ++t) {
      entries.push_back(entry(params[t], t, static_cast<uint32_t>(streams[t]), wds[t], nullptr, nullptr, offsets[t]));
      group.push_back(dtype_index(params[t].scalar_type()));
    }
    launch_grouped(entries, group, kDtypes, chunk, device, [&](int g, const TensorEntry* d, int count, int64_t n,
                                                          int blocks, cudaStream_t stream) {
      dispatch(g, [&](auto tag) {
        launch_multi_tensor(d, count, n, chunk, MezoRange<decltype(tag), Op>{op}, blocks, stream);
      });
    });
  }

  // Sparse MeZO: chunks of whole mask words.
  template <class Op>
  static void sparse_all(at::TensorList params, at::TensorList masks, const at::Tensor& thresholds,
                         at::IntArrayRef streams, const std::vector<int64_t>& offsets, const std::vector<float>& wds,
                         int64_t chunk, const Op& op) {
    TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size() && params.size() == masks.size(),
                "zokern_cuda: list lengths differ");
    if (params.empty()) return;
    const at::Device device = params[0].device();
    check_floats(params, device, "params");
    for (size_t t = 0; t < params.size(); ++t) {
      TORCH_CHECK(masks[t].device() == device && masks[t].is_contiguous() && masks[t].scalar_type() == at::kInt &&
                      masks[t].numel() == (params[t].numel() + 31) / 32,
                  "zokern_cuda: masks must be contiguous int32 tensors with one word per 32 elements");
    }
    const float* h = per_tensor(thresholds, params.size(), device, "thresholds");
    const c10::cuda::CUDAGuard guard(device);
    chunk = chunk_or_default(chunk, 32);  // whole mask words per chunk
    std::vector<TensorEntry> entries;
    std::vector<int> group;
    for (size_t t = 0; t < params.size(); ++t) {
      entries.push_back(entry(params[t], t, static_cast<uint32_t>(streams[t]), wds[t], masks[t].data_ptr(), nullptr,
                              offsets[t]));
      group.push_back(dtype_index(params[t].scalar_type()));
    }
    launch_grouped(entries, group, kDtypes, chunk, device, [&](int g, const TensorEntry* d, int count, int64_t n,
                                                          int blocks, cudaStream_t stream) {
      dispatch(g, [&](auto tag) {
        launch_multi_tensor(d, count, n, chunk, SparseRange<decltype(tag), Op>{op, h}, blocks, stream);
      });
    });
  }

  // Groups: 2·dtype(param) + (D in float32 ? 0 : 1); D is float32 or the param dtype (library-checked).
  template <class Op>
  static void hizoo_all(at::TensorList params, at::TensorList hessians, at::IntArrayRef streams,
                          const std::vector<int64_t>& offsets, const std::vector<float>& wds, int64_t chunk,
                          const Op& op) {
    TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cuda: list lengths differ");
    if (params.empty()) return;
    const at::Device device = params[0].device();
    check_floats(params, device, "params");
    check_companions(params, hessians, device, "hessians");
    const c10::cuda::CUDAGuard guard(device);
    chunk = chunk_or_default(chunk);
    std::vector<TensorEntry> entries;
    std::vector<int> group;
    for (size_t t = 0; t < params.size(); ++t) {
      const auto dtype = hessians[t].scalar_type();
      TORCH_CHECK(dtype == at::kFloat || dtype == params[t].scalar_type(),
                  "zokern_cuda: hessians must be float32 or their tensors' dtype");
      entries.push_back(entry(params[t], t, static_cast<uint32_t>(streams[t]), wds[t], hessians[t].data_ptr(), nullptr,
                              offsets[t]));
      group.push_back(2 * dtype_index(params[t].scalar_type()) + (dtype == at::kFloat ? 0 : 1));
    }
    launch_grouped(entries, group, 2 * kDtypes, chunk, device, [&](int g, const TensorEntry* d, int count, int64_t n,
                                                              int blocks, cudaStream_t stream) {
      dispatch(g / 2, [&](auto tag) {
        using T = decltype(tag);
        if (g % 2 == 0) {
          launch_multi_tensor(d, count, n, chunk, HizooRange<T, float, Op>{op}, blocks, stream);
        } else {
          launch_multi_tensor(d, count, n, chunk, HizooRange<T, T, Op>{op}, blocks, stream);
        }
      });
    });
  }
};

// ---- anchored rescale (DiZO) ----

// Per-chunk partial sums (one launch per dtype, each writing its own slice of `partials`), then one launch
// that sums each tensor's partials in chunk order: deterministic, no atomics, no host synchronisation.
at::Tensor distance_norms(at::TensorList params, at::TensorList anchors, int64_t chunk) {
  TORCH_CHECK(!params.empty(), "zokern_cuda.distance_norms needs at least one tensor");
  const at::Device device = params[0].device();
  check_floats(params, device, "params");
  check_companions(params, anchors, device, "anchors");
  const c10::cuda::CUDAGuard guard(device);
  chunk = chunk_or_default(chunk);
  std::vector<TensorEntry> entries;
  std::vector<int> group;
  for (size_t t = 0; t < params.size(); ++t) {
    entries.push_back(entry(params[t], t, 0, 0.f, anchors[t].data_ptr()));
    group.push_back(dtype_index(params[t].scalar_type()));
  }
  const Groups groups = make_groups(entries, group, kDtypes, chunk);
  std::vector<int64_t> partial_offset(kDtypes + 1, 0);  // group g's partials start here
  for (int g = 0; g < kDtypes; ++g) partial_offset[g + 1] = partial_offset[g] + groups.chunks[g];
  std::vector<DizoNormEntry> finish(params.size(), DizoNormEntry{0, 0, 0});
  for (size_t t = 0; t < params.size(); ++t) finish[t].index = static_cast<int64_t>(t);  // empty: norm 0
  for (int g = 0; g < kDtypes; ++g) {
    for (size_t k = groups.first[g]; k < groups.first[g + 1]; ++k) {
      const TensorEntry& e = groups.table[k];
      finish[e.index] = DizoNormEntry{partial_offset[g] + e.first, (e.numel + chunk - 1) / chunk, e.index};
    }
  }
  Upload up;
  const size_t table_offset = up.add(groups.table), finish_offset = up.add(finish);
  const at::Tensor dev = up.to(device);
  at::Tensor partials = at::empty({partial_offset[kDtypes]}, at::TensorOptions().dtype(at::kFloat).device(device));
  at::Tensor out = at::empty({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kFloat).device(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = max_blocks();
  float* p = partials.data_ptr<float>();
  launch_groups(groups, at_offset<TensorEntry>(dev, table_offset),
                [&](int g, const TensorEntry* d, int count, int64_t n) {
                  dispatch(g, [&](auto tag) {
                    launch_multi_tensor(d, count, n, chunk, DizoNormRange<decltype(tag)>{p + partial_offset[g]}, blocks,
                                        stream);
                  });
                });
  launch_norm_finish(at_offset<DizoNormEntry>(dev, finish_offset), static_cast<int>(params.size()), p,
                     out.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void anchored_rescale_(at::TensorList params, at::TensorList anchors, std::optional<at::TensorList> sources,
                       const at::Tensor& factors, at::IntArrayRef streams, int64_t seed, at::IntArrayRef offsets,
                       int64_t rounding, int64_t chunk) {
  if (params.empty()) return;
  const std::vector<int64_t> ids = per_tensor_or_zeros(streams, params.size(), "stream id");
  const std::vector<int64_t> first = element_offsets(offsets, params.size());
  const at::Device device = params[0].device();
  check_floats(params, device, "params");
  check_companions(params, anchors, device, "anchors");
  if (sources.has_value()) check_companions(params, *sources, device, "sources");
  const float* f = per_tensor(factors, params.size(), device, "factors");
  const c10::cuda::CUDAGuard guard(device);
  chunk = chunk_or_default(chunk);
  std::vector<TensorEntry> entries;
  std::vector<int> group;
  for (size_t t = 0; t < params.size(); ++t) {
    const void* src = sources.has_value() ? (*sources)[t].data_ptr() : params[t].data_ptr();
    TORCH_CHECK(params[t].scalar_type() == anchors[t].scalar_type() &&
                    (!sources.has_value() || (*sources)[t].scalar_type() == params[t].scalar_type()),
                "zokern_cuda: anchors and sources must have their tensors' dtype");
    entries.push_back(entry(params[t], t, static_cast<uint32_t>(ids[t]), 0.f, anchors[t].data_ptr(), src, first[t]));
    group.push_back(dtype_index(params[t].scalar_type()));
  }
  launch_grouped(entries, group, kDtypes, chunk, device, [&](int g, const TensorEntry* d, int count, int64_t n,
                                                        int blocks, cudaStream_t stream) {
    dispatch(g, [&](auto tag) {
      launch_multi_tensor(d, count, n, chunk,
                          DizoRescaleRange<decltype(tag)>{f, static_cast<uint64_t>(seed), rounding == kStochastic},
                          blocks, stream);
    });
  });
}

// ---- low-rank (SubZero) ----

// W += (U·C)·Vᵀ: one launch per factor dtype F for U·C (into a float32 scratch of Σ m·r entries, freed
// stream-ordered), then one tile launch per (W dtype, F) pair. U and V of different dtypes are both
// converted to float32 first.
void lowrank_apply_(at::TensorList weights, at::TensorList us, at::TensorList vs, at::TensorList cores,
                    at::IntArrayRef streams, int64_t seed, at::IntArrayRef offsets, int64_t rounding) {
  const size_t count = weights.size();
  TORCH_CHECK(us.size() == count && vs.size() == count && cores.size() == count, "zokern_cuda: list lengths differ");
  if (count == 0) return;
  const std::vector<int64_t> ids = per_tensor_or_zeros(streams, count, "stream id");
  const std::vector<int64_t> first = element_offsets(offsets, count);
  const at::Device device = weights[0].device();
  check_floats(weights, device, "weights");
  check_floats(us, device, "us");
  check_floats(vs, device, "vs");
  const c10::cuda::CUDAGuard guard(device);

  std::vector<at::Tensor> u_used(count), v_used(count);  // alive until the launches are made
  std::vector<SubzeroEntry> entries(count);
  std::vector<int> factor_dtype(count);
  int64_t scratch = 0;
  for (size_t t = 0; t < count; ++t) {
    const at::Tensor &w = weights[t], &c = cores[t];
    u_used[t] = us[t];
    v_used[t] = vs[t];
    TORCH_CHECK(w.dim() == 2 && u_used[t].dim() == 2 && v_used[t].dim() == 2 && u_used[t].size(0) == w.size(0) &&
                    v_used[t].size(0) == w.size(1) && u_used[t].size(1) == v_used[t].size(1),
                "zokern_cuda: W (m×n) needs U (m×r) and V (n×r)");
    TORCH_CHECK(c.device() == device && c.is_contiguous() && c.scalar_type() == at::kFloat && c.dim() == 2 &&
                    c.size(0) == u_used[t].size(1) && c.size(1) == u_used[t].size(1),
                "zokern_cuda: cores must be contiguous float32 r×r tensors on the weights' device");
    if (u_used[t].scalar_type() != v_used[t].scalar_type()) {
      u_used[t] = u_used[t].to(at::kFloat);
      v_used[t] = v_used[t].to(at::kFloat);
    }
    const int64_t m = w.size(0), n = w.size(1), r = u_used[t].size(1);
    factor_dtype[t] = dtype_index(u_used[t].scalar_type());
    entries[t] = SubzeroEntry{w.data_ptr(), u_used[t].data_ptr(), v_used[t].data_ptr(), c.data_ptr<float>(),
                              nullptr, m, n, r, scratch, (n + kTileN - 1) / kTileN, static_cast<uint32_t>(ids[t]),
                              first[t]};
    if (m * n > 0) scratch += m * r;
  }
  at::Tensor uc = at::empty({scratch}, at::TensorOptions().dtype(at::kFloat).device(device));
  for (SubzeroEntry& e : entries) e.uc = uc.data_ptr<float>() + e.first;

  // U·C tables by F; tile tables by (W dtype, F). `first` becomes the first work item in the launch.
  std::vector<SubzeroEntry> table;
  std::vector<size_t> begin;
  std::vector<int64_t> items;
  for (int g = 0; g < kDtypes + kDtypes * kDtypes; ++g) {
    begin.push_back(table.size());
    items.push_back(0);
    for (size_t t = 0; t < count; ++t) {
      const SubzeroEntry& e = entries[t];
      if (e.m * e.n == 0) continue;
      const bool uc_group = g < kDtypes;
      const int key = uc_group ? factor_dtype[t] : kDtypes + kDtypes * dtype_index(weights[t].scalar_type()) +
                                                       factor_dtype[t];
      const int64_t work = uc_group ? (e.m * e.r + kUcPerBlock - 1) / kUcPerBlock
                                    : (e.m + kTileM - 1) / kTileM * e.tiles_n;
      if (key != g || work == 0) continue;
      table.push_back(e);
      table.back().first = items[g];
      items[g] += work;
    }
  }
  begin.push_back(table.size());
  if (table.empty()) return;
  Upload up;
  const size_t offset = up.add(table);
  const at::Tensor dev = up.to(device);
  const SubzeroEntry* d_table = at_offset<SubzeroEntry>(dev, offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = max_blocks();
  for (int g = 0; g < kDtypes + kDtypes * kDtypes; ++g) {  // every U·C group before any tile group
    const int n = static_cast<int>(begin[g + 1] - begin[g]);
    if (n == 0) continue;
    const SubzeroEntry* d = d_table + begin[g];
    if (g < kDtypes) {
      dispatch(g, [&](auto ftag) { launch_subzero_uc<decltype(ftag)>(d, n, items[g], blocks, stream); });
    } else {
      dispatch((g - kDtypes) / kDtypes, [&](auto wtag) {
        dispatch((g - kDtypes) % kDtypes, [&](auto ftag) {
          launch_subzero_tiles<decltype(wtag), decltype(ftag)>(d, n, items[g], static_cast<uint64_t>(seed),
                                                               rounding == kStochastic, blocks, stream);
        });
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- the random stream ----

void fill_random_(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset, int64_t domain, int64_t dist) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "zokern_cuda: out must be a contiguous float32 CUDA tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  launch_fill(out.data_ptr<float>(), out.numel(), offset, static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
              static_cast<uint32_t>(domain), static_cast<int>(dist), max_blocks(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[k] = the four words of Philox call first_call + k (an int64 n×4 tensor).
void philox_words_(at::Tensor& out, int64_t seed, int64_t stream, int64_t domain, int64_t first_call) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.scalar_type() == at::kLong && out.dim() == 2 &&
                  out.size(1) == 4,
              "zokern_cuda: out must be a contiguous int64 n×4 CUDA tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  launch_philox_words(out.data_ptr<int64_t>(), out.size(0), static_cast<uint64_t>(seed),
                      static_cast<uint32_t>(stream), static_cast<uint32_t>(domain),
                      static_cast<uint64_t>(first_call), max_blocks(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(zokern, CUDA, m) { ZOKERN_IMPL_BACKEND_OPS(m, Loops) }
