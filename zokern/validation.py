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


def check_is_tensor_list(params) -> list:
    """The one check the public functions make before calling an op: torch's schema cast would reject a
    non-tensor first, with a message that names nothing. Every other check runs once, inside the op."""
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
    return list(params)


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


def check_companions(params, others, what: str, *, dtypes=None, shapes=None) -> None:
    """Check tensors that go with params one to one (anchors, Hessians, masks, factors): a list of the same
    length, on the same device, with the given dtypes and shapes (default: each param's own shape)."""
    if isinstance(others, torch.Tensor) or not isinstance(others, (list, tuple)):
        raise TypeError(f"{what} must be a list of tensors, got {type(others).__name__}")
    if len(others) != len(params):
        raise ValueError(f"got {len(params)} tensors but {len(others)} {what}")
    for i, (p, o) in enumerate(zip(params, others)):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(o).__name__}, expected a torch.Tensor")
        if o.device != p.device:
            raise ValueError(f"{what}[{i}] is on {o.device} but params[{i}] is on {p.device}")
        allowed = dtypes(p) if callable(dtypes) else (dtypes or FLOAT_DTYPES)
        if o.dtype not in allowed:
            raise TypeError(f"{what}[{i}] has dtype {o.dtype}; expected one of {', '.join(map(str, allowed))}")
        shape = tuple(p.shape) if shapes is None else tuple(shapes(p, o))
        if tuple(o.shape) != shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(o.shape)}; expected {shape}")


def check_per_tensor(params, values: torch.Tensor, what: str) -> None:
    """A float32 vector with one entry per tensor, on the tensors' device."""
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float32 or values.dim() != 1:
        raise TypeError(f"{what} must be a 1-D float32 tensor with one entry per tensor")
    if values.numel() != len(params):
        raise ValueError(f"{what} has {values.numel()} entries for {len(params)} tensors")
    if params and values.device != params[0].device:
        raise ValueError(f"{what} is on {values.device} but the tensors are on {params[0].device}")


def mask_words(numel: int) -> int:
    return (numel + 31) // 32


def check_lowrank(weights, us, vs, cores) -> None:
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}; low-rank ops take 2-D views "
                             "(see zokern.ops.lowrank_shape)")
    check_companions(weights, us, "us", shapes=lambda w, u: (w.shape[0], u.shape[-1] if u.dim() == 2 else -1))
    check_companions(weights, vs, "vs", shapes=lambda w, v: (w.shape[1], v.shape[-1] if v.dim() == 2 else -1))
    for i, (u, v) in enumerate(zip(us, vs)):
        if u.shape[1] != v.shape[1]:
            raise ValueError(f"us[{i}] has rank {u.shape[1]} but vs[{i}] has rank {v.shape[1]}")
    check_companions(weights, cores, "cores", dtypes=(torch.float32,),
                     shapes=lambda w, c: (c.shape[0], c.shape[0]) if c.dim() == 2 else (-1, -1))
    for i, (u, c) in enumerate(zip(us, cores)):
        if c.shape[0] != u.shape[1]:
            raise ValueError(f"cores[{i}] is {tuple(c.shape)} but the rank of us[{i}] is {u.shape[1]}")
