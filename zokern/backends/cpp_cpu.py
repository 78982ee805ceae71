"""The "cpp" backend: C++ kernels for the CPU, OpenMP-parallel (csrc/cpu/zo_cpu.cpp), built on first use."""
from zokern.backends._extension import CPU_EXTENSION, Backend

NAME = "cpp"
_backend = Backend(NAME, "cpu", CPU_EXTENSION, "zokern_cpp")

availability = _backend.availability
philox_words = _backend.philox_words
fill_random = _backend.fill_random
perturb = _backend.perturb
fused_step = _backend.fused_step
