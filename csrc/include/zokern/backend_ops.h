// The registration of the kernels for the zokern::native_* ops, shared by the CPU (zokern_cpp) and CUDA
// (zokern_cuda) bindings, which differ only in dispatch key and their loops. The ops' schemas are defined once,
// in Python (zokern/library.py: each op's own schema without `str backend`, plus `int chunk=0` where the kernel
// works in chunks); torch checks each kernel's C++ signature against its op's schema. Needs torch headers.
//
// The element-wise ops (MeZO, magnitude mask, diagonal Hessian) turn the schema's scalars into element.h's
// ops here, once; a binding supplies `Loops`, a struct with the device loops
//   template <class Op> static void mezo_all(params, streams, offsets, weight_decays, chunk, op);
//   template <class Op> static void sparse_all(params, masks, thresholds, streams, offsets, weight_decays, chunk, op);
//   template <class Op> static void hizoo_all(params, hessians, streams, offsets, weight_decays, chunk, op);
// offsets: the stream index of each tensor's element 0, one per tensor (an empty list is expanded to zeros here).
// and defines the other kernels under the names registered below.
#pragma once
#include <torch/library.h>

#include <vector>

#include "zokern/element.h"

namespace zokern {

// Per-tensor integers (element offsets, stream ids) given one per tensor or not at all (then 0 for every tensor).
inline std::vector<int64_t> per_tensor_or_zeros(at::IntArrayRef values, size_t count, const char* what) {
  TORCH_CHECK(values.empty() || values.size() == count, "zokern: one ", what, " per tensor, or none");
  return values.empty() ? std::vector<int64_t>(count, 0) : values.vec();
}

inline std::vector<int64_t> element_offsets(at::IntArrayRef offsets, size_t count) {
  return per_tensor_or_zeros(offsets, count, "offset");
}

template <class Loops>
struct ElementwiseOps {
  static std::vector<float> decays(at::ArrayRef<double> weight_decays) {
    return std::vector<float>(weight_decays.begin(), weight_decays.end());
  }

  static void perturb_(at::TensorList params, at::IntArrayRef streams, int64_t seed, double scale, int64_t dist,
                       at::IntArrayRef offsets, int64_t chunk) {
    const MezoPerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist)};
    Loops::mezo_all(params, streams, element_offsets(offsets, params.size()),
                     std::vector<float>(params.size(), 0.f), chunk, op);
  }

  static void fused_step_(at::TensorList params, at::IntArrayRef streams, int64_t seed, double restore, double lr,
                          double grad, at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale,
                          int64_t dist, at::IntArrayRef offsets, int64_t rounding, int64_t chunk) {
    const MezoStepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                    static_cast<float>(grad), next_seed, static_cast<float>(next_scale), static_cast<int>(dist),
                    static_cast<int>(rounding)};
    Loops::mezo_all(params, streams, element_offsets(offsets, params.size()), decays(weight_decays), chunk, op);
  }

  static void masked_perturb_(at::TensorList params, at::TensorList masks, const at::Tensor& thresholds,
                              at::IntArrayRef streams, int64_t seed, double scale, bool compute_mask, int64_t dist,
                              at::IntArrayRef offsets, int64_t chunk) {
    const SparsePerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist),
                             compute_mask};
    Loops::sparse_all(params, masks, thresholds, streams, element_offsets(offsets, params.size()),
                      std::vector<float>(params.size(), 0.f), chunk, op);
  }

  static void masked_fused_step_(at::TensorList params, at::TensorList masks, const at::Tensor& thresholds,
                                 at::IntArrayRef streams, int64_t seed, double restore, double lr, double grad,
                                 at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale,
                                 int64_t dist, at::IntArrayRef offsets, int64_t rounding, int64_t chunk) {
    const SparseStepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                          static_cast<float>(grad), next_seed, static_cast<float>(next_scale),
                          static_cast<int>(dist), static_cast<int>(rounding)};
    Loops::sparse_all(params, masks, thresholds, streams, element_offsets(offsets, params.size()),
                      decays(weight_decays), chunk, op);
  }

  static void hessian_perturb_(at::TensorList params, at::TensorList hessians, at::IntArrayRef streams,
                               int64_t seed, double scale, int64_t dist, at::IntArrayRef offsets, int64_t chunk) {
    const HizooPerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist)};
    Loops::hizoo_all(params, hessians, streams, element_offsets(offsets, params.size()),
                       std::vector<float>(params.size(), 0.f), chunk, op);
  }

  static void hessian_step_(at::TensorList params, at::TensorList hessians, at::IntArrayRef streams, int64_t seed,
                            double restore, double lr, double grad, double hess_scale, double alpha,
                            at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale, int64_t dist,
                            at::IntArrayRef offsets, int64_t rounding, int64_t chunk) {
    const HizooStepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                           static_cast<float>(grad), static_cast<float>(hess_scale), static_cast<float>(alpha),
                           static_cast<float>(1.0 - alpha), next_seed, static_cast<float>(next_scale),
                           static_cast<int>(dist), static_cast<int>(rounding)};
    Loops::hizoo_all(params, hessians, streams, element_offsets(offsets, params.size()), decays(weight_decays),
                       chunk, op);
  }
};

}  // namespace zokern

// chunk <= 0: the default chunk size.
#define ZOKERN_IMPL_BACKEND_OPS(m, Loops) \
  using Elementwise = zokern::ElementwiseOps<Loops>; \
  m.impl("native_philox_words_", &philox_words_); \
  m.impl("native_fill_random_", &fill_random_); \
  m.impl("native_perturb_", &Elementwise::perturb_); \
  m.impl("native_fused_step_", &Elementwise::fused_step_); \
  m.impl("native_lowrank_apply_", &lowrank_apply_); \
  m.impl("native_masked_perturb_", &Elementwise::masked_perturb_); \
  m.impl("native_masked_fused_step_", &Elementwise::masked_fused_step_); \
  m.impl("native_hessian_perturb_", &Elementwise::hessian_perturb_); \
  m.impl("native_hessian_step_", &Elementwise::hessian_step_); \
  m.impl("native_distance_norms", &distance_norms); \
  m.impl("native_anchored_rescale_", &anchored_rescale_);
