"""Builds and loads the C++ extensions on first use, and the Python side of the "cpp" and "cuda" backends.

Each extension is compiled once per process (and cached on disk by torch.utils.cpp_extension, in
$ZOKERN_BUILD_DIR if set, else torch's default cache) and registers its ops in its own namespace:
torch.ops.zokern_cpp (CPU) and torch.ops.zokern_cuda (CUDA). The CUDA extension is a separate build, so
the CPU one works on machines without CUDA. A failed build never raises at import: the reason is kept and
reported by `availability`.

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

from zokern.backends import record_launch

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


# The backend interface (zokern/backends/reference.py), which Backend implements over an extension's ops.
KERNELS = ("availability", "philox_words", "fill_random", "perturb", "fused_step", "lowrank_apply", "masked_perturb",
           "masked_fused_step", "hessian_perturb", "hessian_step", "distance_norms", "anchored_rescale")


class Backend:
    """The backend interface of zokern/backends/reference.py over one extension's ops.

    The CPU extension records one launch per call into it; the CUDA one launches one kernel per dtype
    present in the list (per dtype pair for the Hessian ops; the low-rank op returns its count), which is
    what `launches` counts."""

    def __init__(self, name: str, device_type: str, extension: _Extension, namespace: str):
        self.name, self.device_type, self.extension, self.namespace = name, device_type, extension, namespace

    def module_attributes(self) -> dict:
        """NAME and the interface's functions, for the backend's module to export (cpp_cpu.py, cpp_cuda.py)."""
        return {"NAME": self.name, **{kernel: getattr(self, kernel) for kernel in KERNELS}}

    def availability(self, device_type: str) -> "tuple[bool, str]":
        if device_type != self.device_type:
            return False, f"the {self.name} backend runs on {self.device_type} only"
        if self.device_type == "cuda":
            if torch.version.cuda is None:
                return False, "torch has no CUDA"
            if not torch.cuda.is_available():
                return False, "no CUDA device"
        return self.extension.ensure()

    def _ops(self):
        ok, why = self.extension.ensure()
        if not ok:
            raise RuntimeError(f"zokern backend {self.name!r} is not available: {why}")
        return getattr(torch.ops, self.namespace)

    def _record(self, kernel: str, tensors: list) -> None:
        """Count the launches of one call into the extension (made only when some tensor is non-empty)."""
        launches = len({t.dtype for t in tensors if t.numel() > 0}) if self.device_type == "cuda" else 1
        for _ in range(launches):
            record_launch(self.name, kernel)

    def philox_words(self, seed, stream, domain, first_call, n, device) -> torch.Tensor:
        if n == 0:
            return torch.empty((0, 4), dtype=torch.int64, device=device)
        ops = self._ops()
        record_launch(self.name, "philox_words")
        return ops.philox_words(seed, stream, int(domain), first_call, n, torch.device(device))

    def fill_random(self, out, seed, stream, offset, domain, dist) -> None:
        if out.numel() == 0:
            return
        ops = self._ops()
        self._record("fill_random", [out])
        ops.fill_random_(out, seed, stream, offset, int(domain), int(dist))

    def perturb(self, params, streams, seed, scale, dist, *, chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record("perturb", params)
        ops.perturb_(params, list(streams), seed, float(scale), int(dist), chunk or 0)

    def fused_step(self, params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist,
                   *, chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record("fused_step", params)
        ops.fused_step_(params, list(streams), seed, float(restore), float(lr), float(grad),
                        [float(wd) for wd in weight_decays], next_seed, float(next_scale), int(dist), chunk or 0)

    def lowrank_apply(self, weights, us, vs, cores) -> None:
        if not any(w.numel() for w in weights):
            return
        ops = self._ops()
        launches = ops.lowrank_apply_(weights, us, vs, cores)
        for _ in range(launches if self.device_type == "cuda" else 1):
            record_launch(self.name, "lowrank_apply")

    def masked_perturb(self, params, masks, thresholds, streams, seed, scale, compute_mask, dist, *,
                       chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record("masked_perturb", params)
        ops.masked_perturb_(params, masks, thresholds.contiguous(), list(streams), seed, float(scale),
                            bool(compute_mask), int(dist), chunk or 0)

    def masked_fused_step(self, params, masks, thresholds, streams, seed, restore, lr, grad, weight_decays,
                          next_seed, next_scale, dist, *, chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record("masked_fused_step", params)
        ops.masked_fused_step_(params, masks, thresholds.contiguous(), list(streams), seed, float(restore),
                               float(lr), float(grad), [float(wd) for wd in weight_decays], next_seed,
                               float(next_scale), int(dist), chunk or 0)

    def _record_hessian(self, kernel, params, hessians) -> None:
        """One CUDA launch per (parameter dtype, Hessian dtype) pair present."""
        pairs = {(p.dtype, d.dtype) for p, d in zip(params, hessians) if p.numel() > 0}
        for _ in range(len(pairs) if self.device_type == "cuda" else 1):
            record_launch(self.name, kernel)

    def hessian_perturb(self, params, hessians, streams, seed, scale, dist, *, chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record_hessian("hessian_perturb", params, hessians)
        ops.hessian_perturb_(params, hessians, list(streams), seed, float(scale), int(dist), chunk or 0)

    def hessian_step(self, params, hessians, streams, seed, restore, lr, grad, hess_scale, alpha, weight_decays,
                     next_seed, next_scale, dist, *, chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record_hessian("hessian_step", params, hessians)
        ops.hessian_step_(params, hessians, list(streams), seed, float(restore), float(lr), float(grad),
                          float(hess_scale), float(alpha), [float(wd) for wd in weight_decays], next_seed,
                          float(next_scale), int(dist), chunk or 0)

    def distance_norms(self, params, anchors, *, chunk=None) -> torch.Tensor:
        if not params:
            return torch.empty(0)
        ops = self._ops()
        # CUDA: one partial-sum launch per dtype present, then one that sums each tensor's partials.
        self._record("distance_norms", params)
        if self.device_type == "cuda":
            record_launch(self.name, "distance_norms")
        return ops.distance_norms(params, anchors, chunk or 0)

    def anchored_rescale(self, params, anchors, sources, factors, *, chunk=None) -> None:
        if not any(p.numel() for p in params):
            return
        ops = self._ops()
        self._record("anchored_rescale", params)
        ops.anchored_rescale_(params, anchors, sources, factors.contiguous(), chunk or 0)
