"""The backends and the one place where a backend is chosen.

A backend is a set of kernels, one per op, with the op's arguments but the backend (zokern/library.py's
IMPLEMENTATIONS): "reference" (plain PyTorch, reference.py), "triton" (launchers in triton.py, kernels in
zokern.kernels), and the C++ extensions "cpp" (CPU) and "cuda" (_extension.py builds them). Backends see only
validated input: one device, floating dtypes, contiguous tensors.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "ZOKERN_BACKEND"
# Which backends can serve a device type at all, and the preference when none is named (the Triton
# interpreter is a test vehicle, never an automatic choice on the CPU).
SUPPORTED = {"cpu": ("reference", "triton", "cpp"), "cuda": ("reference", "triton", "cuda")}
_AUTO = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def _extension_availability(name: str) -> tuple[bool, str]:
    """A C++ backend is available once its extension is built (the library built at install, or compiled at first use): loading it
    registers its kernels for the zokern::native_* ops under its device's dispatch key."""
    from zokern.backends._extension import CPU_EXTENSION, CUDA_EXTENSION

    if name == "cuda" and torch.version.cuda is None:
        return False, "torch has no CUDA"
    return (CPU_EXTENSION if name == "cpp" else CUDA_EXTENSION).ensure()


def availability(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend `name` can run on `device_type`, and why (not)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name not in SUPPORTED.get(device_type, ("reference",)):
        return False, f"{name} does not run on {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if name == "reference":
        from zokern.backends import reference

        return reference.availability(device_type)
    if name == "triton":
        from zokern.backends import triton

        return triton.availability(device_type)
    return _extension_availability(name)


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
