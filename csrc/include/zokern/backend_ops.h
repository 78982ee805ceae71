// The schemas of the backend ops and their registration, shared by the CPU (zokern_cpp) and CUDA
// (zokern_cuda) bindings, which differ only in namespace and dispatch key. Needs torch headers; each binding
// defines its kernels under the names registered below before including this.
#pragma once
#include <torch/library.h>

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

#define ZOKERN_IMPL_BACKEND_OPS(m) \
  m.impl("fill_random_", &fill_random_); \
  m.impl("perturb_", &perturb_); \
  m.impl("fused_step_", &fused_step_); \
  m.impl("lowrank_apply_", &lowrank_apply_); \
  m.impl("masked_perturb_", &masked_perturb_); \
  m.impl("masked_fused_step_", &masked_fused_step_); \
  m.impl("hessian_perturb_", &hessian_perturb_); \
  m.impl("hessian_step_", &hessian_step_); \
  m.impl("distance_norms", &distance_norms); \
  m.impl("anchored_rescale_", &anchored_rescale_);
