"""Triton backend: the launcher layer for the kernels in zokern.kernels (top-level kernels/ in the repo).

On CUDA the kernels are compiled; on CPU they run only under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported). perturb and fused_step launch one multi-tensor kernel per dtype present.
"""
from __future__ import annotations

import contextlib

import torch

from zokern.backends import record_launch

NAME = "triton"

try:
    from zokern import kernels
except ImportError as exc:  # triton is optional
    kernels = None
    _IMPORT_ERROR = str(exc)

MASK32 = 0xFFFFFFFF
_CACHE_SIZE = 16
# Launch tables per (device, chunk, tensors, weight decays); parameters keep their storage across steps,
# so a training loop reuses them instead of copying them to the device every call.
_tables_cache: dict = {}


def availability(device_type: str) -> tuple[bool, str]:
    if kernels is None:
        return False, f"cannot import triton kernels: {_IMPORT_ERROR}"
    if device_type == "cpu":
        if kernels.INTERPRET:
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        return False, "Triton runs on CPU only in the interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device_type == "cuda":
        if kernels.INTERPRET:
            return False, "TRITON_INTERPRET=1: kernels are interpreted on the host and cannot run on CUDA"
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False"
        return True, "compiled Triton kernels"
    return False, f"the Triton backend has no {device_type} support"


def _i32(v: int) -> int:
    """A 32-bit value as the int32 with the same bits: every launch then sees int32, whatever the value."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _key(seed: int) -> tuple[int, int]:
    return _i32(seed & MASK32), _i32(seed >> 32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_options() -> dict:
    # Without fusion the compiled code rounds every product and sum as docs/OPS.md writes them (no FMA).
    return {} if kernels.INTERPRET else {"num_warps": 4, "enable_fp_fusion": False}


def _default_sizes(block: "int | None", chunk: "int | None") -> tuple[int, int]:
    # Each interpreted program costs milliseconds of Python, so the interpreter takes big blocks. Compiled,
    # 1024 elements over 4 warps gives each thread 2 Philox calls (8 elements); on sm_90 the fused step with a
    # next perturbation then needs 68 registers and no spills (2048: 117).
    if block is None:
        block = 16384 if kernels.INTERPRET else 1024
    if chunk is None:
        chunk = max(65536, block)
    if block < 4 or block & (block - 1) or block > 1 << 20:
        raise ValueError(f"block must be a power of two in [4, 2**20], got {block}")
    if chunk < 4 or chunk % 4:
        raise ValueError(f"chunk must be a positive multiple of 4, got {chunk}")
    return block, chunk


def philox_words(seed: int, stream: int, domain: int, first_call: int, n: int, device) -> torch.Tensor:
    device = torch.device(device)
    out = torch.empty((n, 4), dtype=torch.int64, device=device)
    if n == 0:
        return out
    block = 16384 if kernels.INTERPRET else 1024
    k0, k1 = _key(seed)
    with _device_ctx(device):
        kernels.philox_words_kernel[(_cdiv(n, block),)](
            out, n, first_call, _i32(stream), _i32(domain), k0, k1, BLOCK=block, **_launch_options())
    record_launch(NAME, "philox_words")
    return out


def fill_random(out: torch.Tensor, seed: int, stream: int, offset: int, domain: int, dist: int) -> None:
    numel = out.numel()
    if numel == 0:
        return
    block = 16384 if kernels.INTERPRET else 1024
    calls = ((offset + numel - 1) >> 2) - (offset >> 2) + 1
    k0, k1 = _key(seed)
    with _device_ctx(out.device):
        kernels.fill_random_kernel[(_cdiv(calls, block // 4),)](
            out, numel, offset, _i32(stream), _i32(domain), k0, k1, DIST=int(dist), BLOCK=block,
            **_launch_options())
    record_launch(NAME, "fill_random")


def _tables(group: list[torch.Tensor], streams: list[int], wds: "list[float] | None", chunk: int,
            device: torch.device):
    """(tensor table int64 [T, 4], weight decays float32 [T] or None, chunk table int32 [C]) on device."""
    key = (device, chunk, tuple((p.data_ptr(), p.numel()) for p in group), tuple(streams),
           None if wds is None else tuple(wds))
    hit = _tables_cache.get(key)
    if hit is not None:
        return hit
    rows, counts, first = [], [], 0
    for p, stream in zip(group, streams):
        count = _cdiv(p.numel(), chunk)
        rows.append((p.data_ptr(), p.numel(), stream, first))
        counts.append(count)
        first += count
    tensors = torch.tensor(rows, dtype=torch.int64, device=device)
    chunks = torch.repeat_interleave(torch.arange(len(group), dtype=torch.int32),
                                     torch.tensor(counts, dtype=torch.int64)).to(device)
    weight_decays = None if wds is None else torch.tensor(wds, dtype=torch.float32, device=device)
    if len(_tables_cache) >= _CACHE_SIZE:
        _tables_cache.pop(next(iter(_tables_cache)))
    _tables_cache[key] = (tensors, weight_decays, chunks)
    return tensors, weight_decays, chunks


def _launch(kernel_name: str, params, streams, weight_decays, block, chunk, dist, seed, restore, lr, grad,
            next_seed, next_scale, fused: bool) -> None:
    block, chunk = _default_sizes(block, chunk)
    groups: dict[torch.dtype, list[int]] = {}
    for idx, p in enumerate(params):
        if p.numel() > 0:
            groups.setdefault(p.dtype, []).append(idx)
    if not groups:
        return
    device = params[groups[next(iter(groups))][0]].device
    k0, k1 = _key(seed)
    nk0, nk1 = _key(next_seed) if next_seed >= 0 else (0, 0)
    codes = {torch.float32: kernels.FLOAT32.value, torch.bfloat16: kernels.BFLOAT16.value,
             torch.float16: kernels.FLOAT16.value}
    with _device_ctx(device):
        for dtype, idxs in groups.items():
            group = [params[i] for i in idxs]
            tensors, wds, chunks = _tables(group, [streams[i] for i in idxs],
                                           [float(weight_decays[i]) for i in idxs] if fused else None,
                                           chunk, device)
            kernels.zo_update_kernel[(chunks.numel(),)](
                tensors, chunks, wds if fused else tensors, chunk, k0, k1, restore, lr, grad, nk0, nk1,
                next_scale, DTYPE=codes[dtype], DIST=int(dist), FUSED=fused, HAS_NEXT=fused and next_seed >= 0,
                ALIGNED_PTRS=all(p.data_ptr() % (4 * p.element_size()) == 0 for p in group),
                ALIGNED_ENDS=all(p.numel() % 4 == 0 for p in group), BLOCK=block, **_launch_options())
            record_launch(NAME, kernel_name)


def perturb(params: list[torch.Tensor], streams: list[int], seed: int, scale: float, dist: int, *,
            block: "int | None" = None, chunk: "int | None" = None) -> None:
    _launch("perturb", params, streams, None, block, chunk, dist, seed, float(scale), 0.0, 0.0, -1, 0.0,
            fused=False)


def fused_step(params: list[torch.Tensor], streams: list[int], seed: int, restore: float, lr: float, grad: float,
               weight_decays: list[float], next_seed: int, next_scale: float, dist: int, *,
               block: "int | None" = None, chunk: "int | None" = None) -> None:
    _launch("fused_step", params, streams, weight_decays, block, chunk, dist, seed, float(restore), float(lr),
            float(grad), next_seed, float(next_scale), fused=True)
