"""The "cpp" backend: C++ kernels for the CPU, OpenMP-parallel (csrc/cpu/zo_cpu.cpp), built on first use."""
from zokern.backends._extension import CPU_EXTENSION, Backend

NAME = "cpp"
_backend = Backend(NAME, "cpu", CPU_EXTENSION, "zokern_cpp")

availability = _backend.availability
philox_words = _backend.philox_words
fill_random = _backend.fill_random
perturb = _backend.perturb
fused_step = _backend.fused_step
lowrank_apply = _backend.lowrank_apply
masked_perturb = _backend.masked_perturb
masked_fused_step = _backend.masked_fused_step
hessian_perturb = _backend.hessian_perturb
hessian_step = _backend.hessian_step
distance_norms = _backend.distance_norms
anchored_rescale = _backend.anchored_rescale
