"""Builds and loads the C++ extensions of the "cpp" and "cuda" backends on first use.

Each extension is compiled once per process (and cached on disk by torch.utils.cpp_extension, in
$ZOKERN_BUILD_DIR if set, else torch's default cache) and registers its kernels for the zokern::native_*
ops (zokern/library.py) under its dispatch key: CPU (zokern_cpp) and CUDA (zokern_cuda). The CUDA
extension is a separate build, so the CPU one works on machines without CUDA. A failed build never raises at
import: the reason is kept and reported by `availability`.

Instead of compiling, an extension can load a library built elsewhere from the same sources
(scripts/build_cuda_extension.py builds the CUDA one on a machine without a GPU): $ZOKERN_CUDA_LIBRARY or
$ZOKERN_CPP_LIBRARY names it, and its manifest (`<library>.json`) must name these sources' digest and the
running torch version, else the backend is unavailable and says why.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch

# -ffp-contract=off: the element math is separately rounded multiplies and adds, like the reference
# (see csrc/include/zokern/element.h); never -ffast-math. -fno-math-errno (no precision change) lets the
# SIMD Box–Muller's square roots vectorise (csrc/cpu/zo_simd.h); -Wno-psabi: its vector helpers are all
# inlined, so GCC's notes on their calling convention are noise. No -march: the CPU kernels pick their ISA
# (AVX-512 / AVX2 / baseline) at run time, so a cached build runs on any x86-64 or other CPU.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-Wno-psabi"]
# No --fmad=false: the kernels spell their multiplies/adds as __fmul_rn/__fadd_rn, which are never fused
# whatever the flags (also in CI's plain nvcc_check build), and CUDA's logf/sinf/cosf keep the default
# code their documented accuracy refers to.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def source_dir() -> Path:
    """The C++/CUDA sources: the package zokern._csrc that setup.py maps to csrc/ (inside zokern/ in an installed
    wheel, the checkout's csrc/ in an editable install), else csrc/ beside an uninstalled checkout's zokern/."""
    spec = importlib.util.find_spec("zokern._csrc")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).resolve().parent
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if checkout.is_dir():
        return checkout
    raise RuntimeError("zokern's C++ sources (the package zokern._csrc) are not installed")


def sources_digest(source_folders: "tuple[str, ...]", flags: "list[str]") -> str:
    """sha256 over the files of an extension's source folders (under csrc/) and its compiler flags."""
    root, digest = source_dir(), hashlib.sha256()
    for folder in source_folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in {".h", ".cuh", ".cu", ".cpp", ".inc"}:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(flags).encode())
    return digest.hexdigest()


class _Extension:
    """One extension, built at most once per process (thread-safe); remembers why a build failed."""

    def __init__(self, name: str, sources: list[str], cuda: bool):
        self.name, self.sources, self.cuda = name, sources, cuda
        self.library_env = f"{name.upper()}_LIBRARY"  # ZOKERN_CPP_LIBRARY, ZOKERN_CUDA_LIBRARY
        # What the compiled code depends on: its own folder, the shared headers, and the flags.
        self.source_folders = (sources[0].split("/")[0], "include")
        self.flags = NVCC_FLAGS if cuda else CXX_FLAGS
        self._lock = threading.Lock()
        self._result: "tuple[bool, str] | None" = None

    def digest(self) -> str:
        return sources_digest(self.source_folders, self.flags)

    def write_manifest(self, library: Path, torch_version: str, **extra) -> Path:
        """The manifest that lets $<library_env> load `library`: built for torch_version from these sources."""
        manifest = Path(str(library) + ".json")
        manifest.write_text(json.dumps({"torch": torch_version, "sources_sha256": self.digest(), **extra},
                                       indent=1) + "\n")
        return manifest

    def _load_prebuilt(self, library: str) -> "tuple[bool, str]":
        manifest_path = Path(library + ".json")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            return False, f"${self.library_env}: cannot read the manifest {manifest_path}: {exc}"
        if manifest.get("torch") != torch.__version__:
            return False, (f"${self.library_env}: {library} was built for torch {manifest.get('torch')}, "
                           f"this is torch {torch.__version__}")
        if manifest.get("sources_sha256") != self.digest():
            return False, f"${self.library_env}: {library} was built from other sources than {source_dir()}"
        try:
            torch.ops.load_library(library)
        except (OSError, RuntimeError) as exc:
            return False, f"${self.library_env}: loading {library} failed: {_first_error(str(exc))}"
        return True, f"{self.name} loaded from {library} (prebuilt)"

    def _precheck(self) -> "str | None":
        if self.cuda:
            from torch.utils.cpp_extension import CUDA_HOME

            if torch.version.cuda is None:
                return "torch has no CUDA"
            if CUDA_HOME is None:
                return "CUDA_HOME not found"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return "no C++ compiler"
        return None

    def _build(self) -> "tuple[bool, str]":
        try:
            src = source_dir()
        except RuntimeError as exc:
            return False, str(exc)
        if os.environ.get(self.library_env):
            if self.cuda and torch.version.cuda is None:
                return False, "torch has no CUDA"
            return self._load_prebuilt(os.environ[self.library_env])
        why = self._precheck()
        if why is not None:
            return False, why
        from torch.utils.cpp_extension import load

        build_directory = self.build_directory()
        build_directory.mkdir(parents=True, exist_ok=True)
        try:
            load(name=self.name, sources=[str(src / s) for s in self.sources],
                 extra_include_paths=[str(src / "include")], extra_cflags=CXX_FLAGS,
                 extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=["-fopenmp"],
                 build_directory=str(build_directory), is_python_module=False, verbose=False)
        except Exception as exc:  # compiler errors, missing toolchain pieces, loader errors
            return False, f"build of {self.name} failed: {_first_error(str(exc))}"
        return True, f"{self.name} built from {src}"

    def build_directory(self) -> Path:
        """Where the compiled library (`<name>.so`) goes: $ZOKERN_BUILD_DIR/<name>-torch<version> (torch's own
        cache keys on the extension name and torch version, a plain folder does not), else torch's cache."""
        if os.environ.get("ZOKERN_BUILD_DIR"):
            return Path(os.environ["ZOKERN_BUILD_DIR"]) / f"{self.name}-torch{torch.__version__}"
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(self.name, verbose=False))

    def ensure(self) -> "tuple[bool, str]":
        with self._lock:
            if self._result is None:
                self._result = self._build()
            return self._result


def _first_error(text: str, lines: int = 3) -> str:
    """The first compiler diagnostics ("...: error: ...") of a build log, else its first lines."""
    all_lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in all_lines if re.search(r"error:", ln, re.IGNORECASE)] or all_lines
    return " | ".join(ln[:300] for ln in found[:lines])


CPU_EXTENSION = _Extension("zokern_cpp", ["cpu/zo_cpu.cpp"], cuda=False)
CUDA_EXTENSION = _Extension("zokern_cuda", ["cuda/zo_cuda.cu"], cuda=True)

