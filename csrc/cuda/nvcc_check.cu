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
  ZK_INSTANTIATE(MezoRange<T, MezoPerturbOp>)                \
  ZK_INSTANTIATE(MezoRange<T, MezoStepOp>)                   \
  ZK_INSTANTIATE(SparseRange<T, SparsePerturbOp>)           \
  ZK_INSTANTIATE(SparseRange<T, SparseStepOp>)              \
  ZK_INSTANTIATE(HizooRange<T, float, HizooPerturbOp>)  \
  ZK_INSTANTIATE(HizooRange<T, float, HizooStepOp>)     \
  ZK_INSTANTIATE(DizoRescaleRange<T>)                           \
  ZK_INSTANTIATE(DizoNormRange<T>)                              \
  template void launch_subzero_uc<T>(const SubzeroEntry*, int, int64_t, int, cudaStream_t);            \
  template void launch_subzero_tiles<T, float>(const SubzeroEntry*, int, int64_t, uint64_t, bool, int, cudaStream_t);  \
  template void launch_subzero_tiles<T, bf16>(const SubzeroEntry*, int, int64_t, uint64_t, bool, int, cudaStream_t);   \
  template void launch_subzero_tiles<T, f16>(const SubzeroEntry*, int, int64_t, uint64_t, bool, int, cudaStream_t);

ZK_INSTANTIATE_DTYPE(float)
ZK_INSTANTIATE_DTYPE(bf16)
ZK_INSTANTIATE_DTYPE(f16)
ZK_INSTANTIATE(HizooRange<bf16, bf16, HizooPerturbOp>)
ZK_INSTANTIATE(HizooRange<bf16, bf16, HizooStepOp>)
ZK_INSTANTIATE(HizooRange<f16, f16, HizooPerturbOp>)
ZK_INSTANTIATE(HizooRange<f16, f16, HizooStepOp>)

#undef ZK_INSTANTIATE_DTYPE
#undef ZK_INSTANTIATE

// Calls the non-template launchers so that their kernels are compiled too.
void nvcc_check_other_kernels(float* out, int64_t* words, const DizoNormEntry* norms, cudaStream_t stream) {
  launch_fill(out, 1, 0, 0, 0, kPerturbation, kNormal, 1, stream);
  launch_philox_words(words, 1, 0, 0, kPerturbation, 0, 1, stream);
  launch_norm_finish(norms, 1, out, out, stream);
}

}  // namespace zokern
