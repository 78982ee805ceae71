"""Loads the C++ extensions built at install (setup.py), else compiles them on first use.

`pip install .` (and the editable install of scripts/setup_env.sh) builds each extension into
zokern/<name>.so; it registers its kernels for the zokern::native_* ops (zokern/library.py) under its dispatch
key: CPU (zokern_cpp) and CUDA (zokern_cuda). The CUDA extension is a separate library, so the CPU one works on
machines without CUDA. Compiling at first use (torch.utils.cpp_extension.load, cached in $ZOKERN_BUILD_DIR if
set, else torch's cache) is only the fallback where that library is missing, does not load, or was built against
another torch or from other sources (an edited checkout); the reason is part of the backend's availability
(`zokern info`). A failed build never raises at import: the reason is kept and reported by `availability`.
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

from zokern.backends import _build

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

