"""Triton backend: the launcher layer for the kernels in zokern.kernels (top-level kernels/ in the repo).

On CUDA the kernels are compiled; on CPU they run only under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported). perturb and fused_step launch one multi-tensor kernel per dtype present.
"""
from __future__ import annotations

import torch

try:
    from zokern import kernels
    from zokern.kernels import dizo, hizoo, sparse, subzero
    from zokern.kernels.multi_tensor import (CODES, alignment, cdiv, default_sizes, device_ctx, i32, launch_groups,
                                             launch_options, seed_words, stochastic, StepScalars)
except ImportError as exc:  # triton is optional
    kernels = None
    _IMPORT_ERROR = str(exc)


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


def philox_words(out: torch.Tensor, seed: int, stream: int, domain: int, first_call: int) -> None:
    n = out.shape[0]
    block = 16384 if kernels.INTERPRET else 1024
    k0, k1 = seed_words(seed)
    with device_ctx(out.device):
        kernels.philox_words_kernel[(cdiv(n, block),)](
            out, n, first_call, i32(stream), i32(domain), k0, k1, BLOCK=block, **launch_options())


def fill_random(out: torch.Tensor, seed: int, stream: int, offset: int, domain: int, dist: int) -> None:
    numel = out.numel()
    if numel == 0:
        return
    block = 16384 if kernels.INTERPRET else 1024
    calls = ((offset + numel - 1) >> 2) - (offset >> 2) + 1
    k0, k1 = seed_words(seed)
    with device_ctx(out.device):
        kernels.fill_random_kernel[(cdiv(calls, block // 4),)](
            out, numel, offset, i32(stream), i32(domain), k0, k1, DIST=int(dist), BLOCK=block,
            **launch_options())


def _launch(params, streams, weight_decays, offsets, dist, scalars: StepScalars, block, chunk) -> None:
    """One mezo_kernel launch per dtype; weight_decays None: a perturbation."""
    block, chunk = default_sizes(block, chunk)
    fused = weight_decays is not None
    for dtype, idxs, group, tensors, wds, chunks in launch_groups(params, lambda i: params[i].dtype, streams,
                                                                  weight_decays, chunk, offsets):
        kernels.mezo_kernel[(chunks.numel(),)](
            tensors, chunks, wds if fused else tensors, chunk, *scalars.kernel_args(), DTYPE=CODES[dtype],
            DIST=int(dist), FUSED=fused, HAS_NEXT=scalars.has_next, STOCHASTIC=stochastic(scalars.rounding, dtype),
            BLOCK=block, **alignment(group, [offsets[i] for i in idxs] if offsets else None), **launch_options())


def perturb(params: list[torch.Tensor], streams: list[int], seed: int, scale: float, dist: int,
            offsets: list[int] = (), *, block: "int | None" = None, chunk: "int | None" = None) -> None:
    _launch(params, streams, None, offsets, dist, StepScalars(seed, scale), block, chunk)


def fused_step(params: list[torch.Tensor], streams: list[int], seed: int, restore: float, lr: float, grad: float,
               weight_decays: list[float], next_seed: int, next_scale: float, dist: int, offsets: list[int] = (),
               rounding: int = 0, *, block: "int | None" = None, chunk: "int | None" = None) -> None:
    _launch(params, streams, weight_decays, offsets, dist,
            StepScalars(seed, restore, lr, grad, next_seed, next_scale, rounding), block, chunk)


# The method ops' launchers live beside their kernels.
if kernels is not None:
    lowrank_apply = subzero.lowrank_apply
    masked_perturb, masked_fused_step = sparse.masked_perturb, sparse.masked_fused_step
    hessian_perturb, hessian_step = hizoo.hessian_perturb, hizoo.hessian_step
    distance_norms, anchored_rescale = dizo.distance_norms, dizo.anchored_rescale
