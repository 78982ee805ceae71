"""Launcher plumbing shared by the method kernels (masked.py, hessian.py, dizo.py, lowrank.py).

The multi-tensor scheme is zo_update.py's: per dtype group, the tensor table and chunk table of
zokern.backends.triton._tables (data_ptr, numel, stream, first chunk). Companion tensors (masks, Hessians,
anchors, sources) and the tensor's index in the caller's list (for per-tensor device vectors such as
thresholds and factors) go in a second int64 table, `extras`, one row per tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Only used at call time: zokern.backends.triton imports this package, so it may be half-initialised here.
from zokern.backends import triton as backend

from .zo_update import BFLOAT16, FLOAT16, FLOAT32, _bf16_bits_rne

CODES = {torch.float32: FLOAT32.value, torch.bfloat16: BFLOAT16.value, torch.float16: FLOAT16.value}
_CACHE_SIZE = 16
_extras_cache: dict = {}


def groups(params, key) -> dict:
    """Indices of the non-empty tensors, grouped by key(index) (one launch per group), in first-seen order."""
    out: dict = {}
    for idx, p in enumerate(params):
        if p.numel() > 0:
            out.setdefault(key(idx), []).append(idx)
    return out


def extras(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """int64 [T, K] table of `rows` on device, cached like backend._tables: tensors keep their storage across
    steps, so a training loop does not copy the table every call."""
    key = (device, tuple(rows))
    hit = _extras_cache.get(key)
    if hit is None:
        hit = torch.tensor(rows, dtype=torch.int64, device=device)
        if len(_extras_cache) >= _CACHE_SIZE:
            _extras_cache.pop(next(iter(_extras_cache)))
        _extras_cache[key] = hit
    return hit


def alignment(tensors) -> dict:
    """zo_update.py's alignment promises: every address aligned to 4 elements of its own dtype (what
    _pointer's ALIGNED means), every numel a multiple of 4 (ends fall on whole Philox calls)."""
    return {"ALIGNED_PTRS": all(t.data_ptr() % (4 * t.element_size()) == 0 for t in tensors),
            "ALIGNED_ENDS": all(t.numel() % 4 == 0 for t in tensors)}


def kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors are passed as their uint16 bits (zo_update.py's _load_f32/_store_f32 convert by hand)."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32(round(x)) in DTYPE, round to nearest even: the value a store of x would leave in memory."""
    if DTYPE == BFLOAT16:
        return (_bf16_bits_rne(x).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == FLOAT16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x
