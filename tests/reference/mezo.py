"""MeZO [ALGORITHMS.md §0]: θ±εz probes, restore, θ ← θ − η(ρz + λθ), λ skipped for biases and norms."""
from .common import NO_DECAY, spsa_along, step_seed, z_like


def mezo_step(named, closure, base_seed, step, lr, eps, weight_decay=0.0):
    seed = step_seed(base_seed, step)
    zs = {name: z_like(seed, name, p) for name, p in named}

    loss_plus, rho = spsa_along(named, closure, zs, eps)
    for name, p in named:
        wd = 0.0 if NO_DECAY.search(name) else weight_decay
        p.data = p.data - lr * (rho * zs[name] + wd * p.data)
    return loss_plus
