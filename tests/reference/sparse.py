"""Sparse MeZO [ALGORITHMS.md §2]: thresholds h per tensor at the start (the (1−s) magnitude percentile);
each step m = |θ| ≤ h from the unperturbed weights, perturb with m⊙z, θ ← θ − ηρ(m⊙z). Vectors dense."""
import math

import torch

from .common import spsa_along, step_seed, z_like


class SparseMeZOReference:
    def __init__(self, named, sparsity):
        self.h = {}
        for name, p in named:
            if p.dim() >= 2:
                flat = p.detach().abs().flatten()
                self.h[name] = torch.kthvalue(flat, max(1, math.ceil((1 - sparsity) * flat.numel()))).values

    def step(self, named, closure, base_seed, step, lr, eps):
        seed = step_seed(base_seed, step)
        dirs = {}
        for name, p in named:
            z = z_like(seed, name, p)
            dirs[name] = z * (p.detach().abs() <= self.h[name]) if name in self.h else z

        loss_plus, rho = spsa_along(named, closure, dirs, eps)
        for name, p in named:
            p.data = p.data - lr * rho * dirs[name]
        return loss_plus
