"""SubZero: low-rank perturbations U·Z0·Vᵀ in a random subspace refreshed every T steps [ALGORITHMS.md §1]."""
from __future__ import annotations

import re

import torch

from zokern import ops
from zokern.distributed import DistributedError
from zokern.optim.base import ZOOptimizer
from zokern.optim.probe import stream_copy
from zokern.random import step_seed


class SubZero(ZOOptimizer):
    """SubZero. Matrices (and, reshaped, >2-D, LoRA and prefix tensors) get P = μ·U·Z0·Vᵀ with orthonormal
    U (m×r), V (n×r) redrawn every `subspace_every` steps and a fresh r×r core Z0 each step, μ = √(mn)/r;
    other tensors get MeZO's z. Plain SGD: no weight decay, as the authors. Defaults: rank 8,
    subspace_every 1000 (the paper; the code uses 2000), eps 1e-3.

    The subspace of window w is drawn from (step_seed(seed, w), tensor id), so it is rebuilt after a
    resume instead of stored. `reshape_pattern` (a regex on parameter names, default LoRA/prefix names)
    selects tensors reshaped to the most-square factorisation of their element count.
    """

    weight_decay_supported = False

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, rank: int = 8, subspace_every: int = 1000,
                 reshape_pattern: str = r"lora_|prefix|prompt", **options):
        if rank < 1 or subspace_every < 1:
            raise ValueError(f"rank and subspace_every must be positive, got {rank}, {subspace_every}")
        self.rank, self.subspace_every, self.reshape_pattern = rank, subspace_every, reshape_pattern
        super().__init__(params, dict(lr=lr, weight_decay=0.0), eps=eps, **options)

    def _init_bucket(self, bucket):
        matrices, vectors = [], []
        for i, name in enumerate(bucket.names):
            shape = ops.lowrank_shape(bucket.shape(i), reshape=bool(name and re.search(self.reshape_pattern, name)))
            (matrices if shape else vectors).append((i, shape))
        bucket.extra["matrices"] = [(i, shape, min(self.rank, *shape)) for i, shape in matrices]
        bucket.extra["rows"] = [_local_rows(bucket, i, shape) for i, shape in matrices]
        bucket.extra["vectors"] = [i for i, _ in vectors]
        bucket.extra["window"] = None

    def _subspaces(self, bucket, step: int):
        """U, V of every matrix for the window holding `step`, cached while the window lasts."""
        window = step // self.subspace_every
        if bucket.extra["window"] != window:
            seed = step_seed(self.seed, window)
            bucket.extra["factors"] = [
                ops.subspace_factors(seed, bucket.stream_ids[i], m, n, r, dtype=bucket.params[i].dtype,
                                     device=bucket.params[i].device, backend=self.backend)
                for i, (m, n), r in bucket.extra["matrices"]]
            bucket.extra["window"] = window
        return bucket.extra["factors"]

    def _cores(self, bucket, seed: int) -> list[torch.Tensor]:
        """μ·Z0(seed) per matrix; the step's three passes share one draw."""
        cached = bucket.extra.get("cores")
        if cached is None or cached[0] != seed:
            cores = [ops.core_matrix(seed, bucket.stream_ids[i], r, device=bucket.params[i].device,
                                     backend=self.backend) * ops.lowrank_scale(m, n, r)
                     for i, (m, n), r in bucket.extra["matrices"]]
            bucket.extra["cores"] = cached = (seed, cores)
        return cached[1]

    def _apply(self, bucket, step: int, cores: list[torch.Tensor], update_seed: "int | None" = None) -> None:
        """W += U·C·Vᵀ per matrix; an update (update_seed: the step's seed, its rounding key) is stored with the
        optimizer's rounding, a perturbation to nearest."""
        matrices = bucket.extra["matrices"]
        if not matrices:
            return
        factors = self._subspaces(bucket, step)
        # A shard is rows [first, first + count) of its matrix: U's same rows perturb it.
        mine = [k for k, (_, count) in enumerate(bucket.extra["rows"]) if count]
        rows = [bucket.extra["rows"][k] for k in mine]
        rounding = {} if update_seed is None else dict(
            rounding=self.rounding, seed=update_seed, stream_ids=[bucket.stream_ids[matrices[k][0]] for k in mine],
            offsets=[first * matrices[k][1][1] for k, (first, _) in zip(mine, rows)])
        ops.lowrank_apply_([bucket.params[matrices[k][0]].view(count, matrices[k][1][1])
                            for k, (_, count) in zip(mine, rows)],
                           [factors[k][0][first:first + count] for k, (first, count) in zip(mine, rows)],
                           [factors[k][1] for k in mine], [cores[k] for k in mine], backend=self.backend, **rounding)

    def _vectors(self, bucket):
        idx = bucket.extra["vectors"]
        return [bucket.params[i] for i in idx], [bucket.stream_ids[i] for i in idx], bucket.offsets_at(idx)

    def _perturb(self, seed, scale, first):
        # Every perturb pass belongs to step_count: the step's own passes, and the pending +εz of two-pass
        # mode, which was drawn for the step that comes next.
        for b in self.buckets:
            self._apply(b, self.step_count, [scale * c for c in self._cores(b, seed)])
            params, ids, offsets = self._vectors(b)
            ops.perturb_(params, seed, scale, stream_ids=ids, dist=self.dist, backend=self.backend, offsets=offsets)

    def _probe(self, b, i, seed, scale, rows):
        p = b.params[i]
        where = [j for j, (index, _, _) in enumerate(b.extra["matrices"]) if index == i]
        if not where:
            return stream_copy(p, seed, b.stream_ids[i], scale, rows, dist=self.dist, backend=self.backend)
        j = where[0]
        shape = b.extra["matrices"][j][1]
        u, v = self._subspaces(b, self.step_count)[j]
        core = scale * self._cores(b, seed)[j]
        if rows is not None and tuple(shape) == tuple(p.shape):
            copy = p[rows]  # rows of W + U·C·Vᵀ are those of W plus U's rows times C·Vᵀ
            ops.lowrank_apply_([copy], [u[rows]], [v], [core], backend=self.backend)
            return copy
        copy = p.detach().clone(memory_format=torch.contiguous_format)
        ops.lowrank_apply_([copy.view(shape)], [u], [v], [core], backend=self.backend)
        return copy if rows is None else copy[rows]

    def _update(self, seed, grad, next_seed, record, restore):
        step = self.step_count
        # The next step's perturbation folds into this pass only while the subspace stays the same.
        same_window = next_seed is not None and (step + 1) // self.subspace_every == step // self.subspace_every
        for b in self.buckets:
            lr = b.group["lr"]
            cores = [(restore - lr * grad) * c for c in self._cores(b, seed)]
            if same_window:
                cores = [c + self.eps * c_next for c, c_next in zip(cores, self._cores(b, next_seed))]
            self._apply(b, step, cores, update_seed=seed)
            params, ids, offsets = self._vectors(b)
            ops.fused_step_(params, seed, stream_ids=ids, restore=restore, lr=lr, grad=grad,
                            next_seed=next_seed, next_scale=self.eps, dist=self.dist, rounding=self.rounding,
                            backend=self.backend, offsets=offsets)
        if next_seed is not None and not same_window:
            for b in self.buckets:
                self._apply(b, step + 1, [self.eps * c for c in self._cores(b, next_seed)])


def _local_rows(bucket, i: int, shape: "tuple[int, int]") -> "tuple[int, int]":
    """(first row, row count) of the bucket's tensor i in its m×n matrix: all rows, or a shard's, which must be
    whole rows (a dim-0 shard of a 2-D weight is; one of a reshaped LoRA tensor may not be)."""
    shard = bucket.shards[i]
    if shard is None:
        return 0, shape[0]
    n, numel = shape[1], bucket.params[i].numel()
    if shard.offset % n or numel % n:
        raise DistributedError(f"SubZero perturbs {bucket.names[i] or '#' + str(i)} as a {shape[0]}x{n} matrix; its "
                               f"shard, elements [{shard.offset}, {shard.offset + numel}), is not whole rows of it: "
                               "leave this tensor unsharded or train it with another method")
    return shard.offset // n, numel // n
