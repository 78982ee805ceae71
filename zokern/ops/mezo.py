"""MeZO's ops: perturb and the fused restore + update (+ next perturbation)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from zokern.random import Distribution, check_seed, check_stream, parse_distribution
from zokern.validation import Rounding, check_finite, check_is_tensor_list, check_offsets, parse_rounding


def checked(params: Iterable[torch.Tensor], stream_ids: Sequence[int], seed: int, next_seed: "int | None" = None,
            offsets: "Sequence[int] | None" = None) -> tuple[list, list, list]:
    """Lists the op can take, and seeds, stream ids and offsets in range: torch's schema cast would reject an
    int beyond int64 first, with a message that names nothing (the op checks the rest)."""
    params = check_is_tensor_list([params] if isinstance(params, torch.Tensor) else list(params))
    stream_ids = [check_stream(k, f"stream_ids[{i}]") for i, k in enumerate(stream_ids)]
    check_seed(seed)
    if next_seed is not None:
        check_seed(next_seed, "next_seed")
    return params, stream_ids, check_offsets(params, [] if offsets is None else offsets)


def rounding_keys(params: list, rounding, seed: "int | None", stream_ids: "Sequence[int] | None",
                  offsets: "Sequence[int] | None") -> tuple[list, int, list, int]:
    """(stream ids, seed, offsets, rounding) of an op that draws nothing but its rounding words: stochastic
    rounding needs the seed and stream ids its words are keyed by; nearest rounding ignores them."""
    rounding = parse_rounding(rounding)
    if rounding == Rounding.STOCHASTIC and (seed is None or stream_ids is None):
        raise ValueError("rounding='stochastic' needs the seed and stream_ids that key the rounding words")
    seed = 0 if seed is None else seed
    _, streams, offsets = checked(params, [] if stream_ids is None else stream_ids, seed, offsets=offsets)
    return streams, seed, offsets, int(rounding)


def weight_decays(weight_decay: "float | Sequence[float]", count: int) -> list[float]:
    if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
        return [check_finite("weight_decay", weight_decay)] * count
    return [check_finite(f"weight_decay[{i}]", wd) for i, wd in enumerate(weight_decay)]


def perturb_(params: Iterable[torch.Tensor], seed: int, scale: float, *, stream_ids: Sequence[int],
             dist: "str | Distribution" = "normal", offsets: "Sequence[int] | None" = None,
             backend: "str | None" = None) -> None:
    """p += scale · z(seed, k) for every tensor p with stream id k, in place, in one call.

    offsets: the stream index of each tensor's element 0 (default 0), so that a shard holding elements
    [o, o + n) of a tensor draws what the whole tensor draws there."""
    params, stream_ids, offsets = checked(params, stream_ids, seed, offsets=offsets)
    if not params:  # an empty tensor list has no device to dispatch on
        return
    with torch.no_grad():
        torch.ops.zokern.perturb_(params, stream_ids, seed, check_finite("scale", scale),
                                  int(parse_distribution(dist)), backend or "", offsets)


def fused_step_(params: Iterable[torch.Tensor], seed: int, *, stream_ids: Sequence[int], restore: float,
                lr: float, grad: float, weight_decay: "float | Sequence[float]" = 0.0,
                next_seed: "int | None" = None, next_scale: float = 0.0,
                dist: "str | Distribution" = "normal", offsets: "Sequence[int] | None" = None,
                rounding: "str | Rounding" = "nearest", backend: "str | None" = None) -> None:
    """Restore, update and optionally re-perturb in one read-modify-write per element (docs/OPS.md).

    From θ − restore·z: x = θ + restore·z; x −= lr·(grad·z + wd·x); x += next_scale·z(next_seed). offsets as
    for perturb_. rounding: how 16-bit tensors store x, "nearest" (even) or "stochastic" (unbiased, keyed by
    (seed, stream id, element): docs/RANDOM.md)."""
    params, stream_ids, offsets = checked(params, stream_ids, seed, next_seed, offsets)
    if not params:
        return
    with torch.no_grad():
        torch.ops.zokern.fused_step_(
            params, stream_ids, seed, check_finite("restore", restore), check_finite("lr", lr),
            check_finite("grad", grad), weight_decays(weight_decay, len(params)),
            -1 if next_seed is None else next_seed, check_finite("next_scale", next_scale),
            int(parse_distribution(dist)), backend or "", offsets, int(parse_rounding(rounding)))
