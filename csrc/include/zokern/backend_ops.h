// The schemas of the backend ops and their registration, shared by the CPU (zokern_cpp) and CUDA
// (zokern_cuda) bindings, which differ only in namespace, dispatch key and their loops. Needs torch headers.
//
// The element-wise ops (MeZO, magnitude mask, diagonal Hessian) turn the schema's scalars into element.h's
// ops here, once; a binding supplies `Loops`, a struct with the device loops
//   template <class Op> static void apply_all(params, streams, weight_decays, chunk, op);
//   template <class Op> static void masked_all(params, masks, thresholds, streams, weight_decays, chunk, op);
//   template <class Op> static void hessian_all(params, hessians, streams, weight_decays, chunk, op);
// and defines the other kernels under the names registered below.
#pragma once
#include <torch/library.h>

#include <vector>

#include "zokern/element.h"

namespace zokern {

template <class Loops>
struct ElementwiseOps {
  static std::vector<float> decays(at::ArrayRef<double> weight_decays) {
    return std::vector<float>(weight_decays.begin(), weight_decays.end());
  }

  static void perturb_(at::TensorList params, at::IntArrayRef streams, int64_t seed, double scale, int64_t dist,
                       int64_t chunk) {
    const PerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist)};
    Loops::apply_all(params, streams, std::vector<float>(params.size(), 0.f), chunk, op);
  }

  static void fused_step_(at::TensorList params, at::IntArrayRef streams, int64_t seed, double restore, double lr,
                          double grad, at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale,
                          int64_t dist, int64_t chunk) {
    const StepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                    static_cast<float>(grad), next_seed, static_cast<float>(next_scale), static_cast<int>(dist)};
    Loops::apply_all(params, streams, decays(weight_decays), chunk, op);
  }

  static void masked_perturb_(at::TensorList params, at::TensorList masks, const at::Tensor& thresholds,
                              at::IntArrayRef streams, int64_t seed, double scale, bool compute_mask, int64_t dist,
                              int64_t chunk) {
    const MaskedPerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist),
                             compute_mask};
    Loops::masked_all(params, masks, thresholds, streams, std::vector<float>(params.size(), 0.f), chunk, op);
  }

  static void masked_fused_step_(at::TensorList params, at::TensorList masks, const at::Tensor& thresholds,
                                 at::IntArrayRef streams, int64_t seed, double restore, double lr, double grad,
                                 at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale,
                                 int64_t dist, int64_t chunk) {
    const MaskedStepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                          static_cast<float>(grad), next_seed, static_cast<float>(next_scale),
                          static_cast<int>(dist)};
    Loops::masked_all(params, masks, thresholds, streams, decays(weight_decays), chunk, op);
  }

  static void hessian_perturb_(at::TensorList params, at::TensorList hessians, at::IntArrayRef streams,
                               int64_t seed, double scale, int64_t dist, int64_t chunk) {
    const HessianPerturbOp op{static_cast<uint64_t>(seed), static_cast<float>(scale), static_cast<int>(dist)};
    Loops::hessian_all(params, hessians, streams, std::vector<float>(params.size(), 0.f), chunk, op);
  }

  static void hessian_step_(at::TensorList params, at::TensorList hessians, at::IntArrayRef streams, int64_t seed,
                            double restore, double lr, double grad, double hess_scale, double alpha,
                            at::ArrayRef<double> weight_decays, int64_t next_seed, double next_scale, int64_t dist,
                            int64_t chunk) {
    const HessianStepOp op{static_cast<uint64_t>(seed), static_cast<float>(restore), static_cast<float>(lr),
                           static_cast<float>(grad), static_cast<float>(hess_scale), static_cast<float>(alpha),
                           static_cast<float>(1.0 - alpha), next_seed, static_cast<float>(next_scale),
                           static_cast<int>(dist)};
    Loops::hessian_all(params, hessians, streams, decays(weight_decays), chunk, op);
  }
};

}  // namespace zokern

// philox_words has no tensor argument to dispatch on, so it is a catch-all kernel; the others are device
// kernels, and a tensor of another device is a dispatcher error. chunk <= 0: the default chunk size.
#define ZOKERN_DEFINE_BACKEND_OPS(m) \
  m.def("philox_words(int seed, int stream, int domain, int first_call, int n, Device device) -> Tensor", \
        &philox_words); \
  m.def("fill_random_(Tensor(a!) out, int seed, int stream, int offset, int domain, int dist) -> ()"); \
  m.def("perturb_(Tensor(a!)[] params, int[] streams, int seed, float scale, int dist, int chunk) -> ()"); \
  m.def("fused_step_(Tensor(a!)[] params, int[] streams, int seed, float restore, float lr, float grad, " \
        "float[] weight_decays, int next_seed, float next_scale, int dist, int chunk) -> ()"); \
  m.def("lowrank_apply_(Tensor(a!)[] weights, Tensor[] us, Tensor[] vs, Tensor[] cores) -> int"); \
  m.def("masked_perturb_(Tensor(a!)[] params, Tensor(b!)[] masks, Tensor thresholds, int[] streams, int seed, " \
        "float scale, bool compute_mask, int dist, int chunk) -> ()"); \
  m.def("masked_fused_step_(Tensor(a!)[] params, Tensor(b!)[] masks, Tensor thresholds, int[] streams, " \
        "int seed, float restore, float lr, float grad, float[] weight_decays, int next_seed, float next_scale, int dist, int chunk) -> ()"); \
  m.def("hessian_perturb_(Tensor(a!)[] params, Tensor[] hessians, int[] streams, int seed, float scale, " \
        "int dist, int chunk) -> ()"); \
  m.def("hessian_step_(Tensor(a!)[] params, Tensor(b!)[] hessians, int[] streams, int seed, float restore, " \
        "float lr, float grad, float hess_scale, float alpha, float[] weight_decays, int next_seed, float next_scale, int dist, int chunk) -> ()"); \
  m.def("distance_norms(Tensor[] params, Tensor[] anchors, int chunk) -> Tensor"); \
  m.def("anchored_rescale_(Tensor(a!)[] params, Tensor[] anchors, Tensor[]? sources, Tensor factors, " \
        "int chunk) -> ()");

#define ZOKERN_IMPL_BACKEND_OPS(m, Loops) \
  using Elementwise = zokern::ElementwiseOps<Loops>; \
  m.impl("fill_random_", &fill_random_); \
  m.impl("perturb_", &Elementwise::perturb_); \
  m.impl("fused_step_", &Elementwise::fused_step_); \
  m.impl("lowrank_apply_", &lowrank_apply_); \
  m.impl("masked_perturb_", &Elementwise::masked_perturb_); \
  m.impl("masked_fused_step_", &Elementwise::masked_fused_step_); \
  m.impl("hessian_perturb_", &Elementwise::hessian_perturb_); \
  m.impl("hessian_step_", &Elementwise::hessian_step_); \
  m.impl("distance_norms", &distance_norms); \
  m.impl("anchored_rescale_", &anchored_rescale_);
