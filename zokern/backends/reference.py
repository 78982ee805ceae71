"""Reference backend: the fused ops written as plain PyTorch from docs/OPS.md. It is the test oracle."""
from __future__ import annotations

import torch

from zokern.random import MASK32, Domain, philox4x32, reference_draw

NAME = "reference"


def availability(device_type: str) -> tuple[bool, str]:
    return True, "plain PyTorch, runs on every device"


def _z(seed: int, stream: int, p: torch.Tensor, dist: int) -> torch.Tensor:
    return reference_draw(seed, stream, p.numel(), domain=Domain.PERTURBATION, dist=dist,
                          device=p.device).view(p.shape)


def philox_words(seed: int, stream: int, domain: int, first_call: int, n: int, device) -> torch.Tensor:
    j = torch.arange(first_call, first_call + n, dtype=torch.int64, device=device)
    return torch.stack(philox4x32((j & MASK32, j >> 32, stream, domain), (seed & MASK32, seed >> 32)), dim=-1)


def fill_random(out: torch.Tensor, seed: int, stream: int, offset: int, domain: int, dist: int) -> None:
    out.copy_(reference_draw(seed, stream, out.numel(), offset, domain, dist, device=out.device).view(out.shape))


def perturb(params: list[torch.Tensor], streams: list[int], seed: int, scale: float, dist: int) -> None:
    for p, stream in zip(params, streams):
        x = p.float() + scale * _z(seed, stream, p, dist)
        p.copy_(x)


def fused_step(params: list[torch.Tensor], streams: list[int], seed: int, restore: float, lr: float, grad: float,
               weight_decays: list[float], next_seed: int, next_scale: float, dist: int) -> None:
    for p, stream, wd in zip(params, streams, weight_decays):
        z = _z(seed, stream, p, dist)
        x = p.float() + restore * z
        x = x - lr * (grad * z + wd * x)
        if next_seed >= 0:
            x = x + next_scale * _z(next_seed, stream, p, dist)
        p.copy_(x)
