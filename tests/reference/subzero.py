"""SubZero [ALGORITHMS.md §1]: P = μ·U·Z0·Vᵀ for matrices (U, V orthonormal, redrawn every T steps),
MeZO's z for the rest; θ ← θ − ηρP."""
import math

import torch

from .common import Domain, spsa_along, step_seed, stream, z_like
from zokern.random import reference_draw


def _orthonormal(seed, name, rows, rank, domain):
    g = reference_draw(seed, stream(name), rows * rank, domain=domain).view(rows, rank)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))


class SubZeroReference:
    def __init__(self, rank, every, core_dist="normal"):
        self.rank, self.every, self.window, self.factors = rank, every, None, {}
        self.core_dist = core_dist

    def directions(self, named, base_seed, step):
        window = step // self.every
        if window != self.window:
            wseed = step_seed(base_seed, window)
            self.factors = {}
            for name, p in named:
                if p.dim() == 2:
                    m, n = p.shape
                    r = min(self.rank, m, n)
                    self.factors[name] = (_orthonormal(wseed, name, m, r, Domain.SUBSPACE_U),
                                          _orthonormal(wseed, name, n, r, Domain.SUBSPACE_V))
            self.window = window
        seed = step_seed(base_seed, step)
        out = {}
        for name, p in named:
            if name in self.factors:
                u, v = self.factors[name]
                r = u.shape[1]
                core = reference_draw(seed, stream(name), r * r, domain=Domain.CORE, dist=self.core_dist).view(r, r)
                out[name] = math.sqrt(p.numel()) / r * (u @ core @ v.t())
            else:
                out[name] = z_like(seed, name, p)
        return out

    def step(self, named, closure, base_seed, step, lr, eps):
        ps = self.directions(named, base_seed, step)

        loss_plus, rho = spsa_along(named, closure, ps, eps)
        for name, p in named:
            p.data = p.data - lr * rho * ps[name]
        return loss_plus
