"""Backend registry and the one place where a backend is chosen.

A backend is a module with NAME, availability(device_type) -> (bool, reason), and the kernels
fill_random, perturb and fused_step (signatures in zokern/backends/reference.py). Backends see only
validated input: one device, floating dtypes, contiguous tensors.
"""
from __future__ import annotations

import collections
import importlib
import os

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "ZOKERN_BACKEND"
# Which backends can serve a device type at all, and the preference when none is named (the Triton
# interpreter is a test vehicle, never an automatic choice on the CPU).
SUPPORTED = {"cpu": ("reference", "triton", "cpp"), "cuda": ("reference", "triton", "cuda")}
_AUTO = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_MODULES = {"reference": "zokern.backends.reference", "triton": "zokern.backends.triton",
            "cpp": "zokern.backends.cpp_cpu", "cuda": "zokern.backends.cpp_cuda"}

# Kernel launches per (backend, kernel name): tests read it to count launches per pass.
launches: collections.Counter = collections.Counter()


def record_launch(backend: str, kernel: str) -> None:
    launches[(backend, kernel)] += 1


def load(name: str):
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return importlib.import_module(_MODULES[name])


def availability(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend `name` can run on `device_type`, and why (not)."""
    if name in BACKENDS and name not in SUPPORTED.get(device_type, ("reference",)):
        return False, f"{name} does not run on {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        module = load(name)
    except ImportError as exc:  # a backend's own dependencies are optional
        return False, f"cannot import: {exc}"
    return module.availability(device_type)


def resolve(requested: "str | None", device_type: str) -> str:
    """The backend to use: the argument, else $ZOKERN_BACKEND, else the best available for the device."""
    name = requested or os.environ.get(ENV_VAR) or None
    if name is not None:
        name = name.lower()
        ok, why = availability(name, device_type)
        if not ok:
            raise RuntimeError(f"zokern backend {name!r} is not available on {device_type}: {why}")
        return name
    for candidate in _AUTO.get(device_type, ("reference",)):
        if availability(candidate, device_type)[0]:
            return candidate
    return "reference"
