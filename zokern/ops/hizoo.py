"""HiZOO's diagonal-Hessian-scaled perturbation and its fused restore + Hessian update + parameter update."""
from __future__ import annotations

from typing import Sequence

import torch

from zokern.library import call
from zokern.ops.mezo import next_seed_arg, tensor_list, weight_decays
from zokern.random import parse_distribution
from zokern.validation import Rounding, parse_rounding


def hessian_perturb_(params, hessians, seed: int, scale: float, *, stream_ids: Sequence[int], dist="normal",
                     offsets: "Sequence[int] | None" = None, backend: "str | None" = None) -> None:
    """p += scale·z/√D; offsets as for perturb_."""
    params = tensor_list(params)
    if not params:
        return
    with torch.no_grad():
        call("hessian_perturb_", params, list(hessians), list(stream_ids), seed, scale, int(parse_distribution(dist)),
             backend or "", [] if offsets is None else offsets)


def hessian_step_(params, hessians, seed: int, *, stream_ids: Sequence[int], restore: float, lr: float,
                  grad: float, hess_scale: float, alpha: float, weight_decay=0.0, next_seed: "int | None" = None,
                  next_scale: float = 0.0, dist="normal", offsets: "Sequence[int] | None" = None,
                  rounding: "str | Rounding" = "nearest", backend: "str | None" = None) -> None:
    """Restore with the old D, D ← (1−α)D + α·hess_scale·D·z², update θ with the new D, in one pass; offsets
    and rounding (of θ; D is stored to nearest) as for fused_step_."""
    params = tensor_list(params)
    if not params:
        return
    with torch.no_grad():
        call("hessian_step_", params, list(hessians), list(stream_ids), seed, restore, lr, grad, hess_scale, alpha,
             weight_decays(weight_decay, len(params)), next_seed_arg(next_seed), next_scale,
             int(parse_distribution(dist)), backend or "", [] if offsets is None else offsets,
             int(parse_rounding(rounding)))
