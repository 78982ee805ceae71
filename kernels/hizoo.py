"""HiZOO's Hessian-scaled perturb and fused step (docs/OPS.md, "Diagonal Hessian").

Multi-tensor like mezo.py, one launch per (weight dtype, D dtype). z / sqrt(D) uses tl.sqrt_rn and
tl.div_rn: on NVIDIA plain `/` and tl.sqrt are approximate for float32; these are IEEE-rounded everywhere
(the interpreter included).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .multi_tensor import (CODES, StepScalars, alignment, default_sizes, extras, launch_groups, launch_options,
                           stochastic)
from .philox import draw_rows
from .mezo import (PERTURBATION, _load_f32, _phase_pointer, _store_f32, call_rows, rounding_rows, step_prologue,
                   store_rounded)


@triton.jit
def _scaled(z, d):
    return tl.div_rn(z, tl.sqrt_rn(d))


@triton.jit(do_not_specialize=["k0", "k1", "nk0", "nk1"])
def hizoo_kernel(tensors, extra, chunks, weight_decays, chunk, k0, k1, restore, lr, grad, nk0, nk1, next_scale,
                   hess_scale, alpha, one_minus_alpha, DTYPE: tl.constexpr, D_DTYPE: tl.constexpr,
                   DIST: tl.constexpr, FUSED: tl.constexpr, HAS_NEXT: tl.constexpr, STOCHASTIC: tl.constexpr,
                   ALIGNED_PTRS: tl.constexpr, ALIGNED_ENDS: tl.constexpr, BLOCK: tl.constexpr):
    """perturb (FUSED=False): x + restore·z/√D with restore = scale, D read only. fused step: restore with
    the old D, D' = (1−α)·D + α·(hess_scale·D·z²), update and next perturbation with D', store x (stochastic
    rounding if STOCHASTIC) and D' (to nearest).
    `extra` rows: (D address,). The alignment flags cover θ and D. one_minus_alpha is 1 − α rounded once from
    double, as the reference's Python scalar is."""
    t, stream, start, end, offset, phase, ptr0, key0, key1, next_key0, next_key1, wd = step_prologue(
        tensors, chunks, weight_decays, chunk, k0, k1, nk0, nk1, DTYPE, FUSED, ALIGNED_PTRS, ALIGNED_ENDS)
    d_ptr0 = _phase_pointer(tl.load(extra + t), phase, D_DTYPE, ALIGNED_PTRS)
    for off in range(0, end - start + phase, BLOCK):
        j, v, inside = call_rows(start, off, offset, phase, end, BLOCK // 4, ALIGNED_ENDS)
        ptr = ptr0 + v
        d_ptr = d_ptr0 + v
        x = _load_f32(ptr, inside, DTYPE)
        # Masked-off lanes are never stored; 1.0 there spares the interpreter's numpy 0/0 warnings.
        d = tl.where(inside, _load_f32(d_ptr, inside, D_DTYPE), 1.0)
        z = draw_rows(j, stream, PERTURBATION, key0, key1, DIST)
        x = x + restore * _scaled(z, d)
        if FUSED:
            d = one_minus_alpha * d + alpha * (hess_scale * d * (z * z))
            x = x - lr * (grad * _scaled(z, d) + wd * x)
            if HAS_NEXT:
                x = x + next_scale * _scaled(draw_rows(j, stream, PERTURBATION, next_key0, next_key1, DIST), d)
            _store_f32(d_ptr, d, inside, D_DTYPE)
        if STOCHASTIC:
            r = rounding_rows(j, stream, key0, key1)
        else:
            r = 0
        store_rounded(ptr, x, inside, r, DTYPE, STOCHASTIC)


@dataclasses.dataclass(frozen=True)
class HizooScalars(StepScalars):
    """A step's scalars and HiZOO's Hessian update; kernel_args() adds (hess_scale, alpha, 1 − α)."""
    hess_scale: float = 0.0
    alpha: float = 0.0

    def kernel_args(self) -> tuple:
        return (*super().kernel_args(), float(self.hess_scale), float(self.alpha), 1.0 - float(self.alpha))


def _launch(params, hessians, streams, weight_decays, offsets, dist, scalars: HizooScalars, block, chunk) -> None:
    """One hizoo_kernel launch per (weight dtype, D dtype); weight_decays None: a perturbation."""
    block, chunk = default_sizes(block, chunk)
    fused = weight_decays is not None
    for (dtype, d_dtype), idxs, group, tensors, wds, chunks in launch_groups(
            params, lambda i: (params[i].dtype, hessians[i].dtype), streams, weight_decays, chunk, offsets):
        extra = extras([(hessians[i].data_ptr(),) for i in idxs], group[0].device)
        group_offsets = [offsets[i] for i in idxs] * 2 if offsets else None  # θ, then D
        hizoo_kernel[(chunks.numel(),)](
            tensors, extra, chunks, wds if fused else tensors, chunk, *scalars.kernel_args(), DTYPE=CODES[dtype],
            D_DTYPE=CODES[d_dtype], DIST=int(dist), FUSED=fused, HAS_NEXT=scalars.has_next,
            STOCHASTIC=stochastic(scalars.rounding, dtype), BLOCK=block,
            **alignment(group + [hessians[i] for i in idxs], group_offsets), **launch_options())


def hessian_perturb(params: list[torch.Tensor], hessians: list[torch.Tensor], streams: list[int], seed: int,
                    scale: float, dist: int, offsets: list[int] = (), *, block: "int | None" = None,
                    chunk: "int | None" = None) -> None:
    _launch(params, hessians, streams, None, offsets, dist, HizooScalars(seed, scale), block, chunk)


def hessian_step(params: list[torch.Tensor], hessians: list[torch.Tensor], streams: list[int], seed: int,
                 restore: float, lr: float, grad: float, hess_scale: float, alpha: float, weight_decays: list[float],
                 next_seed: int, next_scale: float, dist: int, offsets: list[int] = (), rounding: int = 0, *,
                 block: "int | None" = None, chunk: "int | None" = None) -> None:
    _launch(params, hessians, streams, weight_decays, offsets, dist,
            HizooScalars(seed, restore, lr, grad, next_seed, next_scale, rounding, hess_scale, alpha), block, chunk)
