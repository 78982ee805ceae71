"""Sparse MeZO: perturb and update only small-magnitude weights, through a per-step bitmask [ALGORITHMS.md §2]."""
from __future__ import annotations

import warnings

from zokern import distributed, ops
from zokern.optim.base import ZOOptimizer
from zokern.optim.probe import probe_copy, stream_copy


ZERO_START_RULES = ("dense", "tracked")


class SparseMeZO(ZOOptimizer):
    """Sparse MeZO. In each masked tensor only weights with |θ| ≤ h move, h being the tensor's magnitude
    percentile at `sparsity` (default 0.8: the smallest 20% move). The mask is taken from the unperturbed
    weights at the first pass of each step and kept as a bitmask (numel/8 bytes), so every pass of the
    step uses the same mask.

    Choices the paper leaves open [ALGORITHMS.md §2]: tensors with two or more dimensions are masked, and
    vectors (biases, norms) are perturbed densely unless `mask_vectors=True`; thresholds are estimated at
    the first step and re-estimated every `threshold_every` steps (0: never again).

    Tensors that start degenerate, with threshold 0 at the first step (their smallest share is all zeros,
    as LoRA's B at initialisation), have no small-magnitude entries to choose: all of them are. With
    `zero_start="dense"` (the default) such a tensor moves densely at every step (threshold +inf). With
    `zero_start="tracked"` its threshold is re-estimated from its current weights at every step, so (1 −
    sparsity) of it moves; but the entries that grew past the share stop moving, which keeps the tensor near
    its start (measured in docs/OPTIMIZERS.md: Sparse MeZO on LoRA then stays near zero-shot). A threshold of
    0 kept would mask such a tensor out for good after its first update.
    """

    saved_buffers = ("thresholds", "tracked", "masks")

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 sparsity: float = 0.8, threshold_every: int = 0, mask_vectors: bool = False,
                 zero_start: str = "dense", **options):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if zero_start not in ZERO_START_RULES:
            raise ValueError(f"zero_start must be one of {', '.join(ZERO_START_RULES)}, got {zero_start!r}")
        self.sparsity, self.threshold_every, self.mask_vectors = sparsity, threshold_every, mask_vectors
        self.zero_start = zero_start
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **options)
        if not any(b.extra["masked"] for b in self.buckets):
            warnings.warn("SparseMeZO masks no tensor: every trained tensor is a vector and mask_vectors=False, "
                          "so this runs as plain MeZO; pass mask_vectors=True to mask vectors", stacklevel=2)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(_with_tracked(state_dict))

    def _init_bucket(self, bucket):
        masked = [i for i in range(len(bucket.params)) if len(bucket.shape(i)) >= 2 or self.mask_vectors]
        dense = [i for i in range(len(bucket.params)) if i not in set(masked)]
        # tracked: positions in `masked` whose first threshold was 0 (zero_start's tensors), decided at the first
        # estimate (None before).
        bucket.extra.update(masked=masked, dense=dense, masks=ops.new_masks([bucket.params[i] for i in masked]),
                            thresholds=None, tracked=None)

    @staticmethod
    def _select(bucket, key):
        idx, wds = bucket.extra[key], bucket.weight_decays  # once: each read matches every name
        return ([bucket.params[i] for i in idx], [bucket.stream_ids[i] for i in idx], [wds[i] for i in idx],
                bucket.offsets_at(idx))

    def _refresh_due(self, bucket, step: int) -> bool:
        """Whether step `step`'s first pass re-estimates any of the bucket's thresholds."""
        scheduled = self.threshold_every and step % self.threshold_every == 0
        retracked = self.zero_start == "tracked" and bool(bucket.extra["tracked"])
        return bucket.extra["thresholds"] is None or bool(scheduled) or retracked

    def _refresh_thresholds(self, bucket, params, step: int):
        """The thresholds of step `step`, from the current unperturbed weights where they are due."""
        thresholds = bucket.extra["thresholds"]
        tracked = bucket.extra["tracked"]
        if thresholds is None or (self.threshold_every and step % self.threshold_every == 0):
            thresholds = self._magnitude_thresholds(bucket, range(len(params)))
            if tracked is None:
                tracked = bucket.extra["tracked"] = (thresholds == 0).nonzero().flatten().tolist()
            if tracked and self.zero_start == "dense":
                thresholds[tracked] = float("inf")
        elif tracked and self.zero_start == "tracked":
            thresholds = thresholds.clone()
            thresholds[tracked] = self._magnitude_thresholds(bucket, tracked)
        bucket.extra["thresholds"] = thresholds
        return thresholds

    def _magnitude_thresholds(self, bucket, positions):
        """The thresholds of the masked tensors at `positions` (in extra["masked"]): a sharded tensor's is its
        whole tensor's, reduced exactly across its shards."""
        idx = [bucket.extra["masked"][i] for i in positions]
        return distributed.magnitude_thresholds([bucket.params[i] for i in idx], [bucket.shards[i] for i in idx],
                                                self.sparsity, ops.magnitude_thresholds)

    def _perturb(self, seed, scale, first):
        for b in self.buckets:
            params, ids, _, offsets = self._select(b, "masked")
            if params:
                thresholds = self._refresh_thresholds(b, params, self.step_count) if first else b.extra["thresholds"]
                ops.masked_perturb_(params, b.extra["masks"], thresholds, seed, scale, stream_ids=ids,
                                    compute_mask=first, dist=self.dist, backend=self.backend, offsets=offsets)
            params, ids, _, offsets = self._select(b, "dense")
            ops.perturb_(params, seed, scale, stream_ids=ids, dist=self.dist, backend=self.backend, offsets=offsets)

    def _begin_probes(self, seed):
        # The step's thresholds and masks, from the unperturbed weights as the first in-place pass takes them; the
        # stored tensors are only read.
        for b in self.buckets:
            params, _, _, _ = self._select(b, "masked")
            if params:
                thresholds = self._refresh_thresholds(b, params, self.step_count)
                for j, p in enumerate(params):
                    ops.magnitude_mask_(b.extra["masks"][j], p, thresholds[j])

    def _probe(self, b, i, seed, scale, rows):
        p, k = b.params[i], b.stream_ids[i]
        if i not in b.extra["masked"]:
            return stream_copy(p, seed, k, scale, rows, dist=self.dist, backend=self.backend, offsets=b.offsets_at([i]))
        j = b.extra["masked"].index(i)
        threshold = b.extra["thresholds"][j:j + 1]

        def perturb(copies, offsets):
            # The whole tensor takes the step's mask; pieces of rows their own, from the same weights and threshold.
            masks = [b.extra["masks"][j]] if rows is None else ops.new_masks(copies)
            ops.masked_perturb_(copies, masks, threshold.repeat(len(copies)), seed, scale,
                                stream_ids=[k] * len(copies), compute_mask=rows is not None, offsets=offsets,
                                dist=self.dist, backend=self.backend)

        return probe_copy(p, rows, perturb, b.offsets_at([i]))

    def _update(self, seed, grad, next_seed, record, restore):
        for b in self.buckets:
            lr = b.group["lr"]
            params, ids, wds, offsets = self._select(b, "masked")
            if params:
                # Thresholds re-estimated next step need that step's own first pass: don't fold it in here.
                fold = None if self._refresh_due(b, self.step_count + 1) else next_seed
                ops.masked_fused_step_(params, b.extra["masks"], b.extra["thresholds"], seed, stream_ids=ids,
                                       restore=restore, lr=lr, grad=grad, weight_decay=wds, next_seed=fold,
                                       next_scale=self.eps, dist=self.dist, rounding=self.rounding,
                                       backend=self.backend, offsets=offsets)
                if next_seed is not None and fold is None:
                    thresholds = self._refresh_thresholds(b, params, self.step_count + 1)
                    ops.masked_perturb_(params, b.extra["masks"], thresholds, next_seed, self.eps,
                                        stream_ids=ids, compute_mask=True, dist=self.dist, backend=self.backend,
                                        offsets=offsets)
            params, ids, wds, offsets = self._select(b, "dense")
            ops.fused_step_(params, seed, stream_ids=ids, restore=restore, lr=lr, grad=grad, weight_decay=wds,
                            next_seed=next_seed, next_scale=self.eps, dist=self.dist, rounding=self.rounding,
                            backend=self.backend, offsets=offsets)


def _with_tracked(state_dict):
    """A state saved before thresholds could be re-estimated has no "tracked": its thresholds stay fixed, which is
    what tracked=None (never decided) gives. Any other state is returned as it is, for the checks to judge."""
    zo = state_dict.get("zo") if isinstance(state_dict, dict) else None
    method = zo.get("method") if isinstance(zo, dict) else None
    if not (isinstance(method, dict) and "thresholds" in method and "tracked" not in method
            and isinstance(method["thresholds"], list)):
        return state_dict
    return {**state_dict, "zo": {**zo, "method": {**method, "tracked": [None] * len(method["thresholds"])}}}
