// Compile check without torch (CI: nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/nvcc_check.cu -o /tmp/zk.o):
// instantiates every kernel of zo_kernels.cuh that zo_cuda.cu launches, for each dtype (pair) and op.
#include "zo_kernels.cuh"

namespace zokern {

// Variadic: the range's template arguments hold commas.
#define ZK_INSTANTIATE(...)                                                                          \
  template void launch_multi_tensor<__VA_ARGS__>(const TensorEntry*, int, int64_t, int64_t, const __VA_ARGS__&, \
                                                 int, cudaStream_t);

// T: parameter dtype; the Hessian ranges take D in float32 or in T.
#define ZK_INSTANTIATE_DTYPE(T)                             \
  ZK_INSTANTIATE(ElementRange<T, PerturbOp>)                \
  ZK_INSTANTIATE(ElementRange<T, StepOp>)                   \
  ZK_INSTANTIATE(MaskedRange<T, MaskedPerturbOp>)           \
  ZK_INSTANTIATE(MaskedRange<T, MaskedStepOp>)              \
  ZK_INSTANTIATE(HessianRange<T, float, HessianPerturbOp>)  \
  ZK_INSTANTIATE(HessianRange<T, float, HessianStepOp>)     \
  ZK_INSTANTIATE(RescaleRange<T>)                           \
  ZK_INSTANTIATE(NormRange<T>)                              \
  template void launch_lowrank_uc<T>(const LowrankEntry*, int, int64_t, int, cudaStream_t);            \
  template void launch_lowrank_tiles<T, float>(const LowrankEntry*, int, int64_t, uint64_t, bool, int, cudaStream_t);  \
  template void launch_lowrank_tiles<T, bf16>(const LowrankEntry*, int, int64_t, uint64_t, bool, int, cudaStream_t);   \
  template void launch_lowrank_tiles<T, f16>(const LowrankEntry*, int, int64_t, uint64_t, bool, int, cudaStream_t);

ZK_INSTANTIATE_DTYPE(float)
ZK_INSTANTIATE_DTYPE(bf16)
ZK_INSTANTIATE_DTYPE(f16)
ZK_INSTANTIATE(HessianRange<bf16, bf16, HessianPerturbOp>)
ZK_INSTANTIATE(HessianRange<bf16, bf16, HessianStepOp>)
ZK_INSTANTIATE(HessianRange<f16, f16, HessianPerturbOp>)
ZK_INSTANTIATE(HessianRange<f16, f16, HessianStepOp>)

#undef ZK_INSTANTIATE_DTYPE
#undef ZK_INSTANTIATE

// Calls the non-template launchers so that their kernels are compiled too.
void nvcc_check_other_kernels(float* out, int64_t* words, const NormEntry* norms, cudaStream_t stream) {
  launch_fill(out, 1, 0, 0, 0, kPerturbation, kNormal, 1, stream);
  launch_philox_words(words, 1, 0, 0, kPerturbation, 0, 1, stream);
  launch_norm_finish(norms, 1, out, out, stream);
}

}  // namespace zokern
