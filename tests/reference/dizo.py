"""DiZO [ALGORITHMS.md §4]: MeZO steps; every κ steps, J iterations on fresh batches of
γ ± ε_γ·z probes (z a clipped scalar per projected tensor), γ ← clip(γ − ζ·t·g·z, (1∓τ)t), then
θ ← θ0 + (θ − θ0)·γ/t."""
import torch

from .common import Domain, step_seed, stream
from .mezo import mezo_step
from zokern.random import reference_draw


class DiZOReference:
    def __init__(self, named, projected, every, iters, gamma_eps, gamma_lr, tau):
        self.anchor = {name: p.detach().clone() for name, p in named if name in projected}
        self.every, self.iters, self.eg, self.zeta, self.tau = every, iters, gamma_eps, gamma_lr, tau

    def step(self, named, closure, fresh_closures, base_seed, step, lr, eps):
        loss = mezo_step(named, closure, base_seed, step, lr, eps)
        if (step + 1) % self.every:
            return loss
        seed = step_seed(base_seed, step + 1)
        proj = [(name, p) for name, p in named if name in self.anchor]
        saved = {name: p.detach().clone() for name, p in proj}
        t = {name: torch.linalg.vector_norm(saved[name] - self.anchor[name]) for name, _ in proj}
        gamma = dict(t)

        def set_scale(scales):
            for name, p in proj:
                p.data = self.anchor[name] + (saved[name] - self.anchor[name]) * (scales[name] / t[name])

        for j in range(self.iters):
            batch = fresh_closures()
            z = {}
            for name, _ in proj:
                raw = reference_draw(seed, stream(name), 1, offset=j, domain=Domain.DIZO)[0]
                bound = self.tau / self.eg * t[name]
                z[name] = torch.clamp(raw, -bound, bound)
            set_scale({name: gamma[name] + self.eg * z[name] for name, _ in proj})
            loss_plus = float(batch())
            set_scale({name: gamma[name] - self.eg * z[name] for name, _ in proj})
            loss_minus = float(batch())
            g = (loss_plus - loss_minus) / (2 * self.eg)
            for name, _ in proj:
                gamma[name] = torch.clamp(gamma[name] - self.zeta * t[name] * g * z[name],
                                          (1 - self.tau) * t[name], (1 + self.tau) * t[name])
        set_scale(gamma)
        return loss
