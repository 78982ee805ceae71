// Compile check without torch (CI: nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/nvcc_check.cu -o /tmp/zk.o):
// instantiates every kernel of zo_kernels.cuh for each dtype and op, and the non-template launchers.
#include "zo_kernels.cuh"

namespace zokern {

#define ZK_INSTANTIATE(T, OP)                                                                          \
  template void launch_multi_tensor<T, OP>(const TensorEntry*, int, int64_t, int64_t, const OP&, int, \
                                           cudaStream_t);

ZK_INSTANTIATE(float, PerturbOp)
ZK_INSTANTIATE(bf16, PerturbOp)
ZK_INSTANTIATE(f16, PerturbOp)
ZK_INSTANTIATE(float, StepOp)
ZK_INSTANTIATE(bf16, StepOp)
ZK_INSTANTIATE(f16, StepOp)

#undef ZK_INSTANTIATE

// Calls the non-template launchers so that their kernels are compiled too.
void nvcc_check_other_kernels(float* out, int64_t* words, cudaStream_t stream) {
  launch_fill(out, 1, 0, 0, 0, kPerturbation, kNormal, 1, stream);
  launch_philox_words(words, 1, 0, 0, kPerturbation, 0, 1, stream);
}

}  // namespace zokern
