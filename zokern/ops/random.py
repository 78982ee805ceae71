"""Raw stream access: the values of a random stream exactly as a backend's kernels draw them."""
from __future__ import annotations

import torch

from zokern.library import call
from zokern.random import Distribution, Domain, parse_distribution


def draw(seed: int, stream: int, numel: int, offset: int = 0, domain: int = Domain.PERTURBATION,
         dist: "str | int | Distribution" = Distribution.NORMAL, device: "torch.device | str" = "cpu",
         backend: "str | None" = None) -> torch.Tensor:
    """The stream's values exactly as `backend`'s kernels use them (default: the device's backend)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    return fill_random_(out, seed, stream, offset=offset, domain=domain, dist=dist, backend=backend)


def fill_random_(out: torch.Tensor, seed: int, stream: int, *, offset: int = 0,
                 domain: "int | Domain" = Domain.PERTURBATION, dist: "str | Distribution" = "normal",
                 backend: "str | None" = None) -> torch.Tensor:
    """Write elements offset … offset+numel−1 of stream (seed, stream, domain) into float32 `out`."""
    with torch.no_grad():
        call("fill_random_", out, seed, stream, offset, int(domain), int(parse_distribution(dist)), backend or "")
    return out
