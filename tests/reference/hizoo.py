"""HiZOO [ALGORITHMS.md §3]: L0, θ ± εz/√D, restore with the old D, Ĥ = |L+ + L− − 2L0|/(2ε²)·D·z²,
D ← (1−α)D + αĤ, θ ← θ − η(ρ·z/√D_new + λθ)."""
import torch

from .common import step_seed, z_like


class HiZOOReference:
    def __init__(self, named, alpha):
        self.alpha = alpha
        self.d = {name: torch.ones_like(p) for name, p in named}

    def step(self, named, closure, base_seed, step, lr, eps, weight_decay=0.0):
        seed = step_seed(base_seed, step)
        zs = {name: z_like(seed, name, p) for name, p in named}
        loss0 = float(closure())
        for name, p in named:
            p.data = p.data + eps * zs[name] / torch.sqrt(self.d[name])
        loss_plus = float(closure())
        for name, p in named:
            p.data = p.data - 2 * eps * zs[name] / torch.sqrt(self.d[name])
        loss_minus = float(closure())
        for name, p in named:
            p.data = p.data + eps * zs[name] / torch.sqrt(self.d[name])
        rho = (loss_plus - loss_minus) / (2 * eps)
        scale = abs(loss_plus + loss_minus - 2 * loss0) / (2 * eps ** 2)
        for name, p in named:
            d = self.d[name]
            self.d[name] = (1 - self.alpha) * d + self.alpha * scale * d * zs[name] ** 2
            g = rho * zs[name] / torch.sqrt(self.d[name])
            p.data = p.data - lr * (g + weight_decay * p.data)
        return loss_plus
