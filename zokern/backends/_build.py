"""What the C++ extensions are built from and with which flags: the one definition that setup.py (the build at
install, torch.utils.cpp_extension's BuildExtension) and the fallback compile at first use
(zokern/backends/_extension.py) share, so both give the same bits. Imports nothing from zokern or torch: setup.py
loads this file on its own.

An extension built at install is `zokern/<name>.so`, with its build stamp `zokern/<name>.json` (the torch it was
built against and a digest of its sources and flags): a library whose stamp does not match the running torch
and the installed sources is not loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# -ffp-contract=off: the element math is separately rounded multiplies and adds, like the reference
# (see csrc/include/zokern/element.h); never -ffast-math. -fno-math-errno (no precision change) lets the
# SIMD Box–Muller's square roots vectorise (csrc/cpu/zo_simd.h); -Wno-psabi: its vector helpers are all
# inlined, so GCC's notes on their calling convention are noise. No -march: the CPU kernels pick their ISA
# (AVX-512 / AVX2 / baseline) at run time, so a built library runs on any x86-64 or other CPU.
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-Wno-psabi")
# No --fmad=false: the kernels spell their multiplies/adds as __fmul_rn/__fadd_rn, which are never fused
# whatever the flags (also in CI's plain nvcc_check build), and CUDA's logf/sinf/cosf keep the default
# code their documented accuracy refers to.
# Tuples: torch.utils.cpp_extension extends the flag lists it is given in place, so each build gets a copy.
NVCC_FLAGS = ("-O3", "-lineinfo")
LDFLAGS = ("-fopenmp",)
# The CUDA architectures an install builds for when $TORCH_CUDA_ARCH_LIST is unset (Hopper): no GPU is needed to
# build, and torch would otherwise pick the visible GPU's, or fail without one.
DEFAULT_CUDA_ARCH_LIST = "9.0"
# The package the libraries built at install go into (they are not Python modules: torch.ops.load_library loads
# them, and their ops register under torch.ops.<name>).
LIBRARY_PACKAGE = "zokern"


@dataclass(frozen=True)
class ExtensionSource:
    """One extension: its library name (also its torch.ops namespace) and its sources, relative to csrc/."""

    name: str
    sources: "tuple[str, ...]"
    cuda: bool

    @property
    def flags(self) -> "tuple[str, ...]":
        return NVCC_FLAGS if self.cuda else CXX_FLAGS

    @property
    def source_folders(self) -> "tuple[str, ...]":
        """What the compiled code depends on: its own folder and the shared headers."""
        return (self.sources[0].split("/")[0], "include")

    def digest(self, source_root: Path) -> str:
        """sha256 over the files of the source folders (under source_root, i.e. csrc/) and the compiler flags."""
        digest = hashlib.sha256()
        for folder in self.source_folders:
            for path in sorted((source_root / folder).rglob("*")):
                if path.is_file() and path.suffix in {".h", ".cuh", ".cu", ".cpp", ".inc"}:
                    digest.update(path.relative_to(source_root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        digest.update(" ".join(self.flags).encode())
        return digest.hexdigest()

    def write_stamp(self, library: Path, source_root: Path, torch_version: str) -> Path:
        """The build stamp of `library`, built against torch_version from the sources under source_root."""
        stamp = stamp_path(library)
        stamp.write_text(json.dumps({"torch": torch_version, "sources_sha256": self.digest(source_root)}, indent=1)
                         + "\n")
        return stamp


def stamp_path(library: Path) -> Path:
    return library.with_suffix(".json")


CPU = ExtensionSource("zokern_cpp", ("cpu/zo_cpu.cpp",), cuda=False)
CUDA = ExtensionSource("zokern_cuda", ("cuda/zo_cuda.cu",), cuda=True)
