"""HiZOO: perturbations scaled by a diagonal Hessian estimate kept as an EMA [ALGORITHMS.md §3]."""
from __future__ import annotations

import torch

from zokern import ops
from zokern.optim.base import ZOOptimizer
from zokern.optim.probe import probe_copy


class HiZOO(ZOOptimizer):
    """HiZOO: three forward passes per step (L0 at θ, then θ ± εz/√D). One fused pass restores with the
    old D, updates D ← (1−α)D + α·|L+ + L− − 2L0|/(2ε²)·D·z², and applies θ ← θ − η(ρz/√D_new + λθ).

    D starts at ones. `hessian_dtype=None` keeps D in float32 (default: increments of α = 1e-8 survive);
    `hessian_dtype="param"` keeps it in the weight dtype as the authors' fp16 runs do, where most
    increments round away [ALGORITHMS.md §3]. The curvature |L+ + L− − 2L0|/(2ε²) is computed from the
    float losses in float64 (`curvature_dtype="float64"`, default: its cancellation keeps the losses' own
    precision); `"float32"` computes it in float32 as the authors' code does with its fp32 loss tensors.
    Weight decay, if any, applies to every tensor (the authors' code). Defaults: lr 1e-6, eps 1e-3,
    alpha 1e-8 (OPT-13B full fine-tuning).
    """

    two_pass_supported = False
    forwards_per_step = 3
    saved_buffers = ("hessians",)
    measured = ("hess_scale",)

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, alpha: float = 1e-8, weight_decay: float = 0.0,
                 hessian_dtype: "str | None" = None, curvature_dtype: str = "float64", **options):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if hessian_dtype not in (None, "param"):
            raise ValueError(f"hessian_dtype must be None (float32) or 'param', got {hessian_dtype!r}")
        if curvature_dtype not in ("float64", "float32"):
            raise ValueError(f"curvature_dtype must be 'float64' or 'float32', got {curvature_dtype!r}")
        self.alpha, self.hessian_dtype, self.curvature_dtype = alpha, hessian_dtype, curvature_dtype
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **options)

    def _init_bucket(self, bucket):
        # Kept with the bucket, not in per-parameter state: torch's load_state_dict casts per-parameter state to
        # the parameter's dtype, which would round a float32 D of a bf16 model.
        bucket.extra["hessians"] = [
            torch.ones_like(p, dtype=p.dtype if self.hessian_dtype == "param" else torch.float32)
            for p in bucket.params]

    def _options(self):
        return {"alpha": self.alpha}

    def _perturb(self, seed, scale, first):
        for b in self.buckets:
            ops.hessian_perturb_(b.params, b.extra["hessians"], seed, scale, stream_ids=b.stream_ids, dist=self.dist,
                                 backend=self.backend, offsets=b.offsets)

    def _measure(self, losses):
        if self.curvature_dtype == "float32":
            plus, minus, center = torch.tensor([losses["plus"], losses["minus"], losses["center"]], dtype=torch.float32)
            return {"hess_scale": float((plus + minus - 2 * center).abs() / (2 * self.eps ** 2))}
        return {"hess_scale": abs(losses["plus"] + losses["minus"] - 2 * losses["center"]) / (2 * self.eps ** 2)}

    def _probe(self, b, i, seed, scale, rows):
        hessian = b.extra["hessians"][i]

        def perturb(copies, offsets):
            pieces = [hessian] if rows is None else [hessian.reshape(-1)[o:o + c.numel()].view_as(c)
                                                     for c, o in zip(copies, offsets)]
            ops.hessian_perturb_(copies, pieces, seed, scale, stream_ids=[b.stream_ids[i]] * len(copies),
                                 offsets=offsets, dist=self.dist, backend=self.backend)

        return probe_copy(b.params[i], rows, perturb, b.offsets_at([i]))

    def _update(self, seed, grad, next_seed, record, restore):
        for b in self.buckets:
            wd = b.group["weight_decay"]
            ops.hessian_step_(b.params, b.extra["hessians"], seed, stream_ids=b.stream_ids, restore=restore,
                              lr=b.group["lr"], grad=grad, hess_scale=record["hess_scale"], alpha=self.alpha,
                              weight_decay=wd, dist=self.dist, rounding=self.rounding, backend=self.backend,
                              offsets=b.offsets)
