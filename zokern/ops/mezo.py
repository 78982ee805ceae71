"""MeZO's ops: perturb and the fused restore + update (+ next perturbation)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from zokern.library import call
from zokern.random import Distribution, check_seed, parse_distribution
from zokern.validation import Rounding, check_finite, check_is_tensor_list, parse_rounding


def tensor_list(params: "Iterable[torch.Tensor] | torch.Tensor") -> list:
    """The params list the op takes (a lone tensor is a list of one): torch's schema cast would reject a
    non-tensor with a message that names nothing. Seeds, stream ids, offsets and scalars the op checks itself."""
    return check_is_tensor_list([params] if isinstance(params, torch.Tensor) else list(params))


def next_seed_arg(next_seed: "int | None") -> int:
    """The op's next_seed: -1 for none. An explicit -1 is no seed, refused here where it still differs from None."""
    if next_seed is None:
        return -1
    return check_seed(next_seed, "next_seed") if next_seed == -1 else next_seed


def rounding_keys(rounding, seed: "int | None", stream_ids: "Sequence[int] | None",
                  offsets: "Sequence[int] | None") -> tuple[list, int, list, int]:
    """(stream ids, seed, offsets, rounding) of an op that draws nothing but its rounding words: stochastic
    rounding needs the seed and stream ids its words are keyed by; nearest rounding ignores them."""
    rounding = parse_rounding(rounding)
    if rounding == Rounding.STOCHASTIC and (seed is None or stream_ids is None):
        raise ValueError("rounding='stochastic' needs the seed and stream_ids that key the rounding words")
    streams = [] if stream_ids is None else list(stream_ids)
    return streams, 0 if seed is None else seed, [] if offsets is None else offsets, int(rounding)


def weight_decays(weight_decay: "float | Sequence[float]", count: int) -> list:
    """One weight decay per tensor: a single number is checked here, where the error can name it as given."""
    if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
        return [check_finite("weight_decay", weight_decay)] * count
    return list(weight_decay)


def perturb_(params: Iterable[torch.Tensor], seed: int, scale: float, *, stream_ids: Sequence[int],
             dist: "str | Distribution" = "normal", offsets: "Sequence[int] | None" = None,
             backend: "str | None" = None) -> None:
    """p += scale · z(seed, k) for every tensor p with stream id k, in place, in one call.

    offsets: the stream index of each tensor's element 0 (default 0), so that a shard holding elements
    [o, o + n) of a tensor draws what the whole tensor draws there."""
    params = tensor_list(params)
    if not params:  # an empty tensor list has no device to dispatch on
        return
    with torch.no_grad():
        call("perturb_", params, list(stream_ids), seed, scale, int(parse_distribution(dist)), backend or "",
             [] if offsets is None else offsets)


def fused_step_(params: Iterable[torch.Tensor], seed: int, *, stream_ids: Sequence[int], restore: float,
                lr: float, grad: float, weight_decay: "float | Sequence[float]" = 0.0,
                next_seed: "int | None" = None, next_scale: float = 0.0,
                dist: "str | Distribution" = "normal", offsets: "Sequence[int] | None" = None,
                rounding: "str | Rounding" = "nearest", backend: "str | None" = None) -> None:
    """Restore, update and optionally re-perturb in one read-modify-write per element (docs/OPS.md).

    From θ − restore·z: x = θ + restore·z; x −= lr·(grad·z + wd·x); x += next_scale·z(next_seed). offsets as
    for perturb_. rounding: how 16-bit tensors store x, "nearest" (even) or "stochastic" (unbiased, keyed by
    (seed, stream id, element): docs/RANDOM.md)."""
    params = tensor_list(params)
    if not params:
        return
    with torch.no_grad():
        call("fused_step_", params, list(stream_ids), seed, restore, lr, grad, weight_decays(weight_decay, len(params)),
             next_seed_arg(next_seed), next_scale, int(parse_distribution(dist)), backend or "",
             [] if offsets is None else offsets, int(parse_rounding(rounding)))
