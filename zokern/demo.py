"""A small end-to-end MeZO run on the fused ops: a tiny classifier on a synthetic task, on the CPU.

It shows the ops' intended use: per step one +εz pass, one −2εz pass and one fused restore+update
pass (restore = ε, grad = ρ), with z regenerated from the step seed and never stored.
"""
from __future__ import annotations

import time

import torch

import zokern
from zokern.random import step_seed


def make_task(n: int = 2048, dim: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    labels = torch.randint(0, classes, (n,), generator=g)
    inputs = centers[labels] + torch.randn(n, dim, generator=g)
    return inputs, labels


def run_demo(steps: int = 300, lr: float = 2e-2, eps: float = 1e-3, batch: int = 64, seed: int = 0,
             backend: "str | None" = None, log_every: int = 50) -> dict:
    torch.manual_seed(seed)
    inputs, labels = make_task(seed=seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).eval()
    params = list(model.parameters())
    stream_ids = list(range(len(params)))

    def loss_on(idx):
        with torch.inference_mode():
            return torch.nn.functional.cross_entropy(model(inputs[idx]), labels[idx]).item()

    def accuracy():
        with torch.inference_mode():
            return (model(inputs).argmax(-1) == labels).float().mean().item()

    start_acc, start = accuracy(), time.perf_counter()
    g = torch.Generator().manual_seed(seed + 1)
    print(f"MeZO demo: {sum(p.numel() for p in params)} parameters, backend "
          f"{zokern.backends.resolve(backend, 'cpu')}, initial accuracy {start_acc:.3f}")
    for step in range(steps):
        idx = torch.randint(0, inputs.shape[0], (batch,), generator=g)
        s = step_seed(seed, step)
        zokern.perturb_(params, s, eps, stream_ids=stream_ids, backend=backend)
        loss_plus = loss_on(idx)
        zokern.perturb_(params, s, -2 * eps, stream_ids=stream_ids, backend=backend)
        loss_minus = loss_on(idx)
        grad = (loss_plus - loss_minus) / (2 * eps)
        zokern.fused_step_(params, s, stream_ids=stream_ids, restore=eps, lr=lr, grad=grad, backend=backend)
        if (step + 1) % log_every == 0:
            print(f"step {step + 1:5d}  loss {(loss_plus + loss_minus) / 2:.4f}  accuracy {accuracy():.3f}")
    result = {"initial_accuracy": start_acc, "final_accuracy": accuracy(), "steps": steps,
              "seconds": time.perf_counter() - start}
    print(f"done: accuracy {result['initial_accuracy']:.3f} -> {result['final_accuracy']:.3f} "
          f"in {result['seconds']:.1f} s")
    return result
