"""SubZero: low-rank perturbations U·Z0·Vᵀ in a random subspace refreshed every T steps [ALGORITHMS.md §1]."""
from __future__ import annotations

import re

import torch

from zokern import ops
from zokern.distributed import DistributedError
from zokern.optim.base import ZOOptimizer
from zokern.optim.lowrank_side import SideHooks, side_factors
from zokern.optim.probe import stream_copy
from zokern.random import parse_distribution, step_seed


class SubZero(ZOOptimizer):
    """SubZero. Matrices (and, reshaped, >2-D, LoRA and prefix tensors) get P = μ·U·Z0·Vᵀ with orthonormal
    U (m×r), V (n×r) redrawn every `subspace_every` steps and a fresh r×r core Z0 each step, μ = √(mn)/r;
    other tensors get MeZO's z (drawn from `dist`). Plain SGD: no weight decay, as the authors. Defaults: rank 8,
    subspace_every 1000 (the paper; the code uses 2000), eps 1e-3.

    `core_dist` draws the cores: "normal" (Gaussian, the authors'), or "rademacher" / "rademacher_bit" (±1
    entries, docs/RANDOM.md). `dist` does not reach the cores, so a run whose tensors are all low-rank (LoRA)
    draws the same with any `dist`.

    The subspace of window w is drawn from (step_seed(seed, w), tensor id), so it is rebuilt after a
    resume instead of stored. `reshape_pattern` (a regex on parameter names, default LoRA/prefix names)
    selects tensors reshaped to the most-square factorisation of their element count.

    `side_path=True` (probe mode only): the 2-D matrices that are not reshaped are never written by a step.
    Their updates add up in a float32 r×r accumulator A per matrix, merged into the weights by one pass at the
    window's end and before the weights are read (`merge`); an `nn.Linear` holding one computes its probes and
    A as a low-rank term beside x·Wᵀ (zokern/optim/lowrank_side.py, docs/OPTIMIZERS.md).
    """

    weight_decay_supported = False
    updates_low_rank = True

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, rank: int = 8, subspace_every: int = 1000,
                 reshape_pattern: str = r"lora_|prefix|prompt", side_path: bool = False, core_dist="normal",
                 **options):
        if rank < 1 or subspace_every < 1:
            raise ValueError(f"rank and subspace_every must be positive, got {rank}, {subspace_every}")
        if side_path not in (True, False):  # 1 and 0 too, as `--option subzero.side_path=1` gives them
            raise ValueError(f"side_path must be True or False, got {side_path!r}")
        self.rank, self.subspace_every, self.reshape_pattern = rank, subspace_every, reshape_pattern
        self.side_path = bool(side_path)
        try:
            self.core_dist = parse_distribution(core_dist)
        except ValueError as exc:
            raise ValueError(f"core_dist: {exc}") from None
        self.side_hooks: "SideHooks | None" = None
        if self.side_path:
            # merge_unlogged: merges outside a step (evaluation, saving) not yet in the seed log.
            self.saved_buffers = ("merge_unlogged",)
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
        # Side path: the matrices that are their own 2-D shape (an nn.Linear's W, m×n), by position in matrices.
        bucket.extra["side"] = [self.side_path and bucket.params[i].dim() == 2 and tuple(shape) ==
                                tuple(bucket.params[i].shape) for i, shape, _ in bucket.extra["matrices"]]
        bucket.extra["accumulators"] = [torch.zeros(r, r, device=bucket.params[i].device) if side else None
                                        for (i, _, r), side in zip(bucket.extra["matrices"], bucket.extra["side"])]
        bucket.extra["pending"] = False  # the accumulators hold updates not yet merged
        bucket.extra["merge_unlogged"] = 0  # merges outside a step not yet logged: their count at the step count
        bucket.extra["merges"] = (None, 0)  # (step_count, merges made at it): each merge's rounding seed is its own

    def _subspaces(self, bucket, step: int):
        """U, V of every matrix for the window holding `step`, cached while the window lasts. The side path's
        pending updates belong to the cached window: they are merged with its U, V before the refresh."""
        window = step // self.subspace_every
        if bucket.extra["window"] != window:
            self._merge_bucket(bucket)
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
            cores = [ops.core_matrix(seed, bucket.stream_ids[i], r, dist=self.core_dist,
                                     device=bucket.params[i].device, backend=self.backend) * ops.lowrank_scale(m, n, r)
                     for i, (m, n), r in bucket.extra["matrices"]]
            bucket.extra["cores"] = cached = (seed, cores)
        return cached[1]

    def _apply(self, bucket, step: int, cores: list[torch.Tensor], update_seed: "int | None" = None) -> None:
        """W += U·C·Vᵀ on the matrices that are not on the side path (`cores` covers every matrix); an update
        (update_seed: the step's seed, its rounding key) is stored with the optimizer's rounding, a perturbation
        to nearest."""
        matrices = bucket.extra["matrices"]
        if not matrices:
            return
        factors = self._subspaces(bucket, step)
        # A shard is rows [first, first + count) of its matrix: U's same rows perturb it.
        mine = [k for k, (_, count) in enumerate(bucket.extra["rows"]) if count and not bucket.extra["side"][k]]
        if not mine:
            return
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

    # --- the side path ------------------------------------------------------------------------------------

    def _side_keys(self) -> set:
        return {(id(b), b.extra["matrices"][j][0]) for b in self.buckets for j, side in enumerate(b.extra["side"])
                if side}

    def attach(self, model: torch.nn.Module) -> "SubZero":
        if self.side_path and self.forwards_gather:
            raise DistributedError("SubZero's side path does not take sharded (FSDP2) parameters: a sharded Linear "
                                   "computes with its gathered weight, not the stored one the side term goes with; "
                                   "construct SubZero without side_path (its probe copies work on shards)")
        super().attach(model)
        if self.side_path:
            if not self._side_keys():
                self.detach()
                raise ValueError("side_path=True: none of the trained tensors is a 2-D matrix taken as it is (an "
                                 "nn.Linear weight); construct SubZero without side_path")
            self.side_hooks = SideHooks(self, model, self._side_keys())
        return self

    def detach(self) -> None:
        """Leave probe mode, with the side path's pending updates merged into the weights first."""
        self.merge()
        if self.side_hooks is not None:
            self.side_hooks.remove()
            self.side_hooks = None
        super().detach()

    def _merge_bucket(self, bucket, legacy_seed: bool = False) -> bool:
        """W += U·A·Vᵀ for the bucket's side-path matrices in one pass, A then zero; whether anything was
        pending. `legacy_seed`: round with the first merge's seed whatever the count (seed logs from before
        merges were counted)."""
        if not bucket.extra["pending"]:
            return False
        chosen = [j for j, side in enumerate(bucket.extra["side"]) if side]
        matrices, factors = bucket.extra["matrices"], bucket.extra["factors"]
        accumulators = bucket.extra["accumulators"]
        step, made = bucket.extra["merges"]
        index = made if step == self.step_count else 0
        # Stored with the optimizer's rounding, keyed by a seed of the merge's own: derived from the step's and
        # from how many merges the step count has seen (a save, then the window's end), so no two merges share
        # rounding words; replay and resume count the same merges, so they round with the same bits.
        seed = step_seed(step_seed(self.seed, self.step_count), 1)
        if index and not legacy_seed:
            seed = step_seed(seed, index)
        ops.lowrank_apply_([bucket.params[matrices[j][0]] for j in chosen], [factors[j][0] for j in chosen],
                           [factors[j][1] for j in chosen], [accumulators[j] for j in chosen], backend=self.backend,
                           rounding=self.rounding, seed=seed,
                           stream_ids=[bucket.stream_ids[matrices[j][0]] for j in chosen])
        for j in chosen:
            accumulators[j].zero_()
        bucket.extra["pending"] = False
        bucket.extra["merges"] = (self.step_count, index + 1)
        return True

    @torch.no_grad()
    def merge(self) -> None:
        """Merge the side path's pending updates into the stored weights (one `lowrank_apply_` pass per bucket).
        Done at each window's end; `restore_weights`, `unperturbed`, `state_dict` (the optimizer's, and the
        attached model's) and any forward outside a step call it, so evaluation and saving read merged weights.
        Call it before reading the weights any other way. A merge here is recorded in the next step's seed-log
        record ("merged"), so replay and resume merge at the same point."""
        for b in self.buckets:
            if self._merge_bucket(b):
                b.extra["merge_unlogged"] = b.extra["merges"][1]

    def restore_weights(self) -> None:
        self.merge()
        super().restore_weights()

    def state_dict(self) -> dict:
        self.merge()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # A saved state holds no pending updates (state_dict merges them); updates pending here are dropped. The
        # unlogged merges (a flag in states saved before merges were counted) are those the saved step count saw.
        for b in self.buckets:
            for a in b.extra["accumulators"]:
                if a is not None:
                    a.zero_()
            b.extra["pending"] = False
            b.extra["merge_unlogged"] = int(b.extra["merge_unlogged"])
            b.extra["merges"] = (self.step_count, b.extra["merge_unlogged"])

    def step(self, closure=None, fresh_closure=None):
        if self.side_path and self.module_probes is None:
            raise ValueError("SubZero(side_path=True) trains in probe mode only: construct it from the model, or "
                             "call opt.attach(model) before stepping")
        return super().step(closure, fresh_closure)

    def _complete_record(self, record: dict) -> None:
        # Merges outside a step go into the record of the next step that happened, applied or skipped (replay
        # merges before it), with their count at its step count.
        unlogged = [b.extra["merge_unlogged"] for b in self.buckets if b.extra["merge_unlogged"]]
        if unlogged:
            record["merged"] = max(unlogged)
            for b in self.buckets:
                b.extra["merge_unlogged"] = 0

    def replay_step(self, record: dict) -> None:
        if self.side_path and not record.get("probed"):
            raise ValueError(f"record of step {record.get('step')} was trained in place; SubZero(side_path=True) "
                             "replays probe-mode steps only")
        if record.get("merged"):
            for b in self.buckets:
                self._merge_bucket(b)
        super().replay_step(record)

    # --- what a method defines ----------------------------------------------------------------------------

    def _perturb(self, seed, scale, first):
        # Every perturb pass belongs to step_count: the step's own passes, and the pending +εz of two-pass
        # mode, which was drawn for the step that comes next.
        for b in self.buckets:
            self._apply(b, self.step_count, [scale * c for c in self._cores(b, seed)])
            params, ids, offsets = self._vectors(b)
            ops.perturb_(params, seed, scale, stream_ids=ids, dist=self.dist, backend=self.backend, offsets=offsets)

    def _begin_probes(self, seed):
        # A window that ended on a skipped step merges here, before any forward, rather than inside one.
        for b in self.buckets:
            if b.extra["matrices"]:
                self._subspaces(b, self.step_count)

    def _probe(self, b, i, seed, scale, rows):
        p = b.params[i]
        where = [j for j, (index, _, _) in enumerate(b.extra["matrices"]) if index == i]
        if not where:
            return stream_copy(p, seed, b.stream_ids[i], scale, rows, dist=self.dist, backend=self.backend,
                               offsets=b.offsets_at([i]))
        j = where[0]
        shape = b.extra["matrices"][j][1]
        u, v = self._subspaces(b, self.step_count)[j]
        core = scale * self._cores(b, seed)[j]
        if b.extra["side"][j]:
            core = core + b.extra["accumulators"][j]
            call = self.side_hooks.take((id(b), i)) if rows is None and self.side_hooks is not None else None
            if call is not None:  # an nn.Linear computes with the stored W plus the side term
                call.term = side_factors(u, v, core)
                return None
        if rows is not None and tuple(shape) == tuple(p.shape):
            copy = p[rows]  # rows of W + U·C·Vᵀ are those of W plus U's rows times C·Vᵀ
            ops.lowrank_apply_([copy], [u[rows]], [v], [core], backend=self.backend)
            return copy
        # A shard is rows [first, first + count) of the matrix: U's same rows perturb it.
        first, count = b.extra["rows"][j]
        copy = p.detach().clone(memory_format=torch.contiguous_format)
        ops.lowrank_apply_([copy.view(count, shape[1])], [u[first:first + count]], [v], [core], backend=self.backend)
        return copy if rows is None else copy[rows]

    def _update(self, seed, grad, next_seed, record, restore):
        step = self.step_count
        # The next step's perturbation folds into this pass only while the subspace stays the same.
        window_ends = (step + 1) // self.subspace_every != step // self.subspace_every
        same_window = next_seed is not None and not window_ends
        # A log written before merges were counted says `true`: its window-end merge took the first merge's seed.
        legacy_seed = record.get("merged") is True
        for b in self.buckets:
            lr = b.group["lr"]
            if any(b.extra["side"]):
                self._subspaces(b, step)  # the accumulators' window, merged below at its end
            cores = [(restore - lr * grad) * c for c in self._cores(b, seed)]
            for side, a, c in zip(b.extra["side"], b.extra["accumulators"], cores):
                if side:
                    a.add_(c)
                    b.extra["pending"] = True
            if same_window:
                cores = [c + self.eps * c_next for c, c_next in zip(cores, self._cores(b, next_seed))]
            self._apply(b, step, cores, update_seed=seed)
            if window_ends:
                self._merge_bucket(b, legacy_seed)
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
