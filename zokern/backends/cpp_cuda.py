"""The "cuda" backend: multi-tensor CUDA kernels (csrc/cuda/zo_cuda.cu), built on first use."""
from zokern.backends._extension import CUDA_EXTENSION, Backend

NAME = "cuda"
_backend = Backend(NAME, "cuda", CUDA_EXTENSION, "zokern_cuda")

availability = _backend.availability
philox_words = _backend.philox_words
fill_random = _backend.fill_random
perturb = _backend.perturb
fused_step = _backend.fused_step
