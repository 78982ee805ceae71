"""The "cuda" backend: multi-tensor CUDA kernels (csrc/cuda/zo_cuda.cu), built at install."""
from zokern.backends._extension import CUDA_EXTENSION, Backend

globals().update(Backend("cuda", "cuda", CUDA_EXTENSION, "zokern_cuda").module_attributes())
