"""The "cpp" backend: C++ kernels for the CPU, OpenMP-parallel (csrc/cpu/zo_cpu.cpp), built at install."""
from zokern.backends._extension import CPU_EXTENSION, Backend

globals().update(Backend("cpp", "cpu", CPU_EXTENSION, "zokern_cpp").module_attributes())
