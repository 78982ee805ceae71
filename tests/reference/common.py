import re
import zlib

import torch

from zokern.random import Domain, reference_draw, step_seed

NO_DECAY = re.compile(r"bias|layer_norm|layernorm|norm\.weight|ln_\w*\.weight", re.IGNORECASE)


def stream(name: str) -> int:
    return zlib.crc32(name.encode())


def z_like(seed: int, name: str, p: torch.Tensor, domain=Domain.PERTURBATION, dist="normal") -> torch.Tensor:
    return reference_draw(seed, stream(name), p.numel(), domain=domain, dist=dist).view(p.shape).to(p.dtype)


def spsa(closure, perturb, eps: float):
    """θ+εP → L+, θ−εP → L−, back to θ. Returns (L+, L−, ρ)."""
    perturb(eps)
    loss_plus = float(closure())
    perturb(-2 * eps)
    loss_minus = float(closure())
    perturb(eps)
    return loss_plus, loss_minus, (loss_plus - loss_minus) / (2 * eps)


def spsa_along(named, closure, directions: dict, eps: float):
    """spsa with θ ± εP for fixed directions P (one per parameter name). Returns (L+, ρ)."""
    def perturb(scale):
        for name, p in named:
            p.data = p.data + scale * directions[name]

    loss_plus, _, rho = spsa(closure, perturb, eps)
    return loss_plus, rho


__all__ = ["NO_DECAY", "stream", "z_like", "spsa", "spsa_along", "step_seed", "Domain"]
