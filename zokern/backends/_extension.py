"""Loads the C++ extensions built at install (setup.py), else compiles them on first use, and the Python side of
the "cpp" and "cuda" backends.

`pip install .` (and the editable install of scripts/setup_env.sh) builds each extension into
zokern/<name>.so; it registers its ops in its own namespace: torch.ops.zokern_cpp (CPU) and
torch.ops.zokern_cuda (CUDA). The CUDA extension is a separate library, so the CPU one works on machines without
CUDA. Compiling at first use (torch.utils.cpp_extension.load, cached in $ZOKERN_BUILD_DIR if set, else torch's
cache) is only the fallback where that library is missing, does not load, or was built against another torch or
from other sources (an edited checkout); the reason is part of the backend's availability (`zokern info`). A
failed build never raises at import: the reason is kept and reported by `availability`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import torch

from zokern.backends import _build, record_launch

LIBRARY_DIR = Path(__file__).resolve().parents[1]  # the package _build.LIBRARY_PACKAGE


def source_dir() -> Path:
    """The C++/CUDA sources: the package zokern._csrc that pyproject.toml maps to csrc/ (inside zokern/ in an
    installed wheel, the checkout's csrc/ in an editable install), else csrc/ beside an uninstalled checkout's
    zokern/."""
    spec = importlib.util.find_spec("zokern._csrc")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).resolve().parent
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if checkout.is_dir():
        return checkout
    raise RuntimeError("zokern's C++ sources (the package zokern._csrc) are not installed")


class _Extension:
    """One extension, loaded (or built) at most once per process (thread-safe); remembers why it is unavailable."""

    def __init__(self, source: _build.ExtensionSource, library_dir: Path = LIBRARY_DIR):
        self.source, self.name, self.cuda = source, source.name, source.cuda
        self.library = library_dir / f"{source.name}.so"
        self._lock = threading.Lock()
        self._result: "tuple[bool, str] | None" = None

    def _compile_precheck(self) -> "str | None":
        if self.cuda:
            from torch.utils.cpp_extension import CUDA_HOME

            if CUDA_HOME is None:
                return "CUDA_HOME not found"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return "no C++ compiler"
        return None

    def _installed_library_problem(self, src: Path) -> "str | None":
        """Why the library built at install cannot be used here (None: it can)."""
        kind = "CUDA" if self.cuda else "CPU"
        if not self.library.is_file():
            return f"zokern was installed without its compiled {kind} extension"
        try:
            stamp = json.loads(_build.stamp_path(self.library).read_text())
        except (OSError, ValueError) as exc:
            return f"the build stamp of {self.library} is unreadable ({exc})"
        if stamp.get("torch") != torch.__version__:
            return f"{self.library} was built against torch {stamp.get('torch')}, this is torch {torch.__version__}"
        if stamp.get("sources_sha256") != self.source.digest(src):
            return f"{self.library} was built from other sources than {src}"
        return None

    def _load(self) -> "tuple[bool, str]":
        if self.cuda and torch.version.cuda is None:
            return False, "torch has no CUDA"
        try:
            src = source_dir()
        except RuntimeError as exc:
            return False, str(exc)
        problem = self._installed_library_problem(src)
        if problem is None:
            try:
                torch.ops.load_library(str(self.library))
                return True, f"{self.name} built at install: {self.library}"
            except (OSError, RuntimeError) as exc:
                problem = f"{self.library} does not load ({_first_error(str(exc))})"
        return self._compile(src, problem)

    def _compile(self, src: Path, reason: str) -> "tuple[bool, str]":
        """The fallback: compile at first use, for `reason` (why the library built at install is not used)."""
        why = self._compile_precheck()
        if why is not None:
            return False, f"{reason}; cannot compile it now: {why}"
        warnings.warn(f"{reason}: compiling {self.name} now (a minute or two)", RuntimeWarning)
        from torch.utils.cpp_extension import load

        build_directory = self.build_directory()
        build_directory.mkdir(parents=True, exist_ok=True)
        try:
            load(name=self.name, sources=[str(src / s) for s in self.source.sources],
                 extra_include_paths=[str(src / "include")], extra_cflags=list(_build.CXX_FLAGS),
                 extra_cuda_cflags=list(_build.NVCC_FLAGS), extra_ldflags=list(_build.LDFLAGS),
                 build_directory=str(build_directory), is_python_module=False, verbose=False)
        except Exception as exc:  # compiler errors, missing toolchain pieces, loader errors
            return False, f"{reason}; compiling {self.name} at first use failed: {_first_error(str(exc))}"
        return True, f"{self.name} compiled at first use into {build_directory} ({reason})"

    def build_directory(self) -> Path:
        """Where the fallback compiles to (`<name>.so`): $ZOKERN_BUILD_DIR/<name>-torch<version> (torch's own
        cache keys on the extension name and torch version, a plain folder does not), else torch's cache."""
        if os.environ.get("ZOKERN_BUILD_DIR"):
            return Path(os.environ["ZOKERN_BUILD_DIR"]) / f"{self.name}-torch{torch.__version__}"
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(self.name, verbose=False))

    def ensure(self) -> "tuple[bool, str]":
        with self._lock:
            if self._result is None:
                self._result = self._load()
            return self._result


def _first_error(text: str, lines: int = 3) -> str:
    """The first compiler diagnostics ("...: error: ...") of a build log, else its first lines."""
    all_lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in all_lines if re.search(r"error:", ln, re.IGNORECASE)] or all_lines
    return " | ".join(ln[:300] for ln in found[:lines])


CPU_EXTENSION = _Extension(_build.CPU)
CUDA_EXTENSION = _Extension(_build.CUDA)


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
