"""Sparse MeZO's magnitude mask: thresholds, a per-step bitmask, and the masked perturb and fused step."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from zokern.library import call
from zokern.ops.mezo import next_seed_arg, tensor_list, weight_decays
from zokern.random import parse_distribution
from zokern.validation import Rounding, mask_words, parse_rounding


def magnitude_thresholds(params: Sequence[torch.Tensor], sparsity: float) -> torch.Tensor:
    """Per tensor, the exact k-th smallest |θ| with k = max(1, ceil((1 − sparsity)·numel)): the mask
    |θ| ≤ h keeps the smallest (1 − sparsity) share of the weights. One float32 entry per tensor."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    values = []
    for p in params:
        flat = p.detach().reshape(-1).abs().float()
        if flat.numel() == 0:
            values.append(flat.new_zeros(()))
            continue
        k = max(1, math.ceil((1.0 - sparsity) * flat.numel()))
        values.append(torch.kthvalue(flat, k).values)
    device = params[0].device if params else "cpu"
    return torch.stack(values) if values else torch.empty(0, device=device)


def new_masks(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bitmask buffers (one int32 word per 32 elements) for masked_perturb_."""
    return [torch.zeros(mask_words(p.numel()), dtype=torch.int32, device=p.device) for p in params]


def unpack_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The boolean mask a bitmask holds, shaped like `like`."""
    bits = torch.arange(32, device=mask.device, dtype=torch.int64)
    flat = ((mask.to(torch.int64).unsqueeze(-1) >> bits) & 1).reshape(-1)[:like.numel()]
    return flat.bool().view(like.shape)


def magnitude_mask_(mask: torch.Tensor, param: torch.Tensor, threshold: torch.Tensor,
                    chunk: int = 1 << 20) -> torch.Tensor:
    """Writes into `mask` the bitmask m = |float32(param)| ≤ threshold that masked_perturb_ with compute_mask takes
    (bit b of word w is element 32w + b, the last word's spare bits 0), reading `param` only: `chunk` elements at
    a time (a multiple of 32), so the temporaries stay a chunk's, not a copy of the tensor. Returns `mask`."""
    flat = param.detach().reshape(-1)
    shifts = torch.arange(32, dtype=torch.int32, device=param.device)
    for start in range(0, flat.numel(), chunk):
        bits = (flat[start:start + chunk].float().abs() <= threshold).to(torch.int32)
        bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 32))
        # Distinct powers of two: the int32 sum has no carries, and bit 31 is the sign bit.
        words = (bits.view(-1, 32) << shifts).sum(-1, dtype=torch.int32)
        mask[start // 32:start // 32 + words.numel()].copy_(words)
    return mask


def masked_perturb_(params, masks, thresholds: torch.Tensor, seed: int, scale: float, *,
                    stream_ids: Sequence[int], compute_mask: bool, dist="normal",
                    offsets: "Sequence[int] | None" = None, backend: "str | None" = None) -> None:
    """p += scale·m·z; with compute_mask the mask m = |p| ≤ h is taken from p first and stored in `masks`.
    offsets as for perturb_ (they move the draws, not the mask: bit b of word w is local element 32w + b)."""
    params = tensor_list(params)
    if not params:
        return
    with torch.no_grad():
        call("masked_perturb_", params, list(masks), thresholds, list(stream_ids), seed, scale, bool(compute_mask),
             int(parse_distribution(dist)), backend or "", [] if offsets is None else offsets)


def masked_fused_step_(params, masks, thresholds: torch.Tensor, seed: int, *, stream_ids: Sequence[int],
                       restore: float, lr: float, grad: float, weight_decay=0.0, next_seed: "int | None" = None,
                       next_scale: float = 0.0, dist="normal", offsets: "Sequence[int] | None" = None,
                       rounding: "str | Rounding" = "nearest", backend: "str | None" = None) -> None:
    """Masked restore + update (+ the next step's mask and perturbation) in one pass (docs/OPS.md); offsets as
    for masked_perturb_. rounding (as for fused_step_) rounds the update; with a next perturbation, the
    perturbed weights are then rounded to nearest, as masked_perturb_ rounds them."""
    params = tensor_list(params)
    if not params:
        return
    with torch.no_grad():
        call("masked_fused_step_", params, list(masks), thresholds, list(stream_ids), seed, restore, lr, grad,
             weight_decays(weight_decay, len(params)), next_seed_arg(next_seed), next_scale,
             int(parse_distribution(dist)), backend or "", [] if offsets is None else offsets,
             int(parse_rounding(rounding)))
