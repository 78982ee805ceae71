"""HiZOO's diagonal-Hessian-scaled perturbation and its fused restore + Hessian update + parameter update."""
from __future__ import annotations

from typing import Sequence

import torch

from zokern.ops.mezo import checked, weight_decays
from zokern.random import parse_distribution
from zokern.validation import Rounding, check_finite, parse_rounding


def hessian_perturb_(params, hessians, seed: int, scale: float, *, stream_ids: Sequence[int], dist="normal",
                     offsets: "Sequence[int] | None" = None, backend: "str | None" = None) -> None:
    """p += scale·z/√D; offsets as for perturb_."""
    params, stream_ids, offsets = checked(params, stream_ids, seed, offsets=offsets)
    if not params:
        return
    with torch.no_grad():
        torch.ops.zokern.hessian_perturb_(params, list(hessians), stream_ids, seed, check_finite("scale", scale),
                                          int(parse_distribution(dist)), backend or "", offsets)


def hessian_step_(params, hessians, seed: int, *, stream_ids: Sequence[int], restore: float, lr: float,
                  grad: float, hess_scale: float, alpha: float, weight_decay=0.0, next_seed: "int | None" = None,
                  next_scale: float = 0.0, dist="normal", offsets: "Sequence[int] | None" = None,
                  rounding: "str | Rounding" = "nearest", backend: "str | None" = None) -> None:
    """Restore with the old D, D ← (1−α)D + α·hess_scale·D·z², update θ with the new D, in one pass; offsets
    and rounding (of θ; D is stored to nearest) as for fused_step_."""
    params, stream_ids, offsets = checked(params, stream_ids, seed, next_seed, offsets)
    if not params:
        return
    with torch.no_grad():
        torch.ops.zokern.hessian_step_(
            params, list(hessians), stream_ids, seed, check_finite("restore", restore), check_finite("lr", lr),
            check_finite("grad", grad), check_finite("hess_scale", hess_scale), check_finite("alpha", alpha),
            weight_decays(weight_decay, len(params)), -1 if next_seed is None else next_seed,
            check_finite("next_scale", next_scale), int(parse_distribution(dist)), backend or "", offsets,
            int(parse_rounding(rounding)))
