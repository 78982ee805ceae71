"""MeZO: the SPSA step with the seed trick [ALGORITHMS.md §0], three (or two) fused passes per step."""
from __future__ import annotations

from zokern import ops
from zokern.optim.base import ZOOptimizer
from zokern.optim.probe import stream_copy


class MeZO(ZOOptimizer):
    """MeZO. Defaults from the paper: lr 1e-6, eps 1e-3, no weight decay (decay skips biases and norms).

    Passes over the weights per step: +εz, −2εz, then restore + update in one fused pass (3); with
    `two_pass=True` the update also applies the next step's +εz (2), and `restore_weights()` or
    `with opt.unperturbed():` brings the weights back for evaluation or saving.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, **options):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **options)

    def _perturb(self, seed, scale, first):
        for b in self.buckets:
            ops.perturb_(b.params, seed, scale, stream_ids=b.stream_ids, dist=self.dist, backend=self.backend,
                         offsets=b.offsets)

    def _probe(self, b, i, seed, scale, rows):
        return stream_copy(b.params[i], seed, b.stream_ids[i], scale, rows, dist=self.dist, backend=self.backend,
                           offsets=b.offsets_at([i]))

    def _update(self, seed, grad, next_seed, record, restore):
        for b in self.buckets:
            ops.fused_step_(b.params, seed, stream_ids=b.stream_ids, restore=restore, lr=b.group["lr"], grad=grad,
                            weight_decay=b.weight_decays, next_seed=next_seed, next_scale=self.eps,
                            dist=self.dist, rounding=self.rounding, backend=self.backend, offsets=b.offsets)
