"""Argument checks shared by every op. They run before any tensor is touched, so a rejected call
leaves every tensor as it was."""
from __future__ import annotations

import math

import torch

from zokern.random import check_seed, check_stream, parse_distribution

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor_list(params, streams, check_aliasing: bool = True) -> "str | None":
    """Check a list of parameter tensors and their stream ids; return the common device type.

    check_aliasing reads data pointers, which fake tensors (tracing) do not have."""
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    if len(streams) != len(params):
        raise ValueError(f"got {len(params)} tensors but {len(streams)} stream ids")
    device = None
    seen: dict[int, int] = {}
    for i, (p, k) in enumerate(zip(params, streams)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; zokern ops take float32, bfloat16 or float16 tensors")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {device}; "
                             "one call takes tensors on one device")
        check_stream(k, f"stream_ids[{i}]")
        if check_aliasing and p.numel() > 0:
            ptr = p.data_ptr()
            if ptr in seen:
                raise ValueError(f"params[{i}] and params[{seen[ptr]}] share memory; each tensor may appear once")
            seen[ptr] = i
    return None if device is None else device.type


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_step_args(*, seed: int, dist: int, count: int = 0, next_seed: int = -1, weight_decays=(), **scalars) -> None:
    check_seed(seed)
    parse_distribution(dist)
    for name, value in scalars.items():
        check_finite(name, value)
    if next_seed != -1:
        check_seed(next_seed)
    if count and len(weight_decays) != count:
        raise ValueError(f"got {len(weight_decays)} weight decays for {count} tensors")
    for i, wd in enumerate(weight_decays):
        check_finite(f"weight_decay[{i}]", wd)


def check_fill_args(out, seed: int, stream: int, offset: int, domain: int, dist: int) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise TypeError(f"out must be a float32 tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    check_seed(seed)
    check_stream(stream)
    check_stream(domain, "domain")
    parse_distribution(dist)
    if offset < 0 or offset + out.numel() > 1 << 62:
        raise ValueError(f"offset must be in [0, 2**62 - numel], got {offset}")
