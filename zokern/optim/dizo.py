"""DiZO: MeZO steps plus, every κ steps, a ZO search of each projected layer's distance from the
pre-trained weights, applied as θ ← θ0 + (θ − θ0)·γ/t [ALGORITHMS.md §4]."""
from __future__ import annotations

import math
import re
import warnings

import torch

from zokern import distributed, ops
from zokern.optim.base import check_loss
from zokern.optim.mezo import MeZO
from zokern.random import Domain, step_seed


# The authors' choice: attention k_proj and v_proj weights when all weights train, and every LoRA tensor (A and B)
# when LoRA adapters train (PEFT names them `...lora_A.<adapter>.weight`).
PROJECT_PATTERN = r"(k_proj|v_proj)\.weight$|\.lora_[AB]\."


class DiZO(MeZO):
    """DiZO. Every step is MeZO's. Tensors whose names match `project_pattern` (default `PROJECT_PATTERN`:
    attention k_proj and v_proj weights, or every LoRA tensor in LoRA mode, as the authors' code; selected
    by name so any architecture works) keep an anchor copy θ0 of their initial values, in the weight dtype.
    A pattern that matches none of the trained tensors is an error (DiZO would silently be MeZO). Every
    `project_every` (κ) steps, `project_iters` (J) iterations each probe γ ± ε_γ·z on a fresh batch and
    update γ; the weights are finally rescaled.

    Fresh batches: call `opt.step(closure, fresh_closure=make_closure)` where `make_closure()` returns a
    new closure on a new batch; the search calls it once per iteration and evaluates both probes of that
    iteration on its batch. Without it the search reuses the step's closure (one batch; a warning says so).
    Probes read a saved copy of the projected weights, so probing never drifts θ. The authors leave a
    token embedding tied to the output layer out of training (`trains_tied_embeddings`).
    Defaults (authors' code): κ 50, ε_γ 0.1, ζ 2.0, τ 0.2, J 10, lr 1e-7, eps 1e-3.
    """

    two_pass_supported = False
    trains_tied_embeddings = False
    saved_buffers = ("anchors",)

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, weight_decay: float = 0.0,
                 project_every: int = 50, project_iters: int = 10, gamma_eps: float = 0.1, gamma_lr: float = 2.0,
                 gamma_range: float = 0.2, project_pattern: str = PROJECT_PATTERN, **options):
        for name, value in (("project_every", project_every), ("project_iters", project_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not gamma_eps > 0:
            raise ValueError(f"gamma_eps must be positive, got {gamma_eps!r}")
        if not 0 < gamma_range < 1:
            raise ValueError(f"gamma_range must be in (0, 1): the factor is searched in [(1 - τ)t, (1 + τ)t], "
                             f"got {gamma_range!r}")
        self.project_every, self.project_iters = project_every, project_iters
        self.gamma_eps, self.gamma_lr, self.gamma_range = gamma_eps, gamma_lr, gamma_range
        self.project_pattern = re.compile(project_pattern)
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, **options)
        if not any(True for _ in self._projected()):
            names = [name for b in self.buckets for name in b.names if name is not None]
            if not names:
                raise ValueError("DiZO chooses the tensors it projects by name: pass model.named_parameters()")
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ValueError(f"DiZO's project_pattern {project_pattern!r} matches none of the {len(names)} trained "
                             f"tensors ({shown}); without a projected tensor DiZO is plain MeZO")

    @property
    def mean_forwards_per_step(self) -> float:
        """2 + 2J/κ (2.4 with the defaults)."""
        return self.forwards_per_step + 2 * self.project_iters / self.project_every

    @property
    def fresh_batches_per_search(self) -> int:
        return self.project_iters

    def _init_bucket(self, bucket):
        projected = [i for i, name in enumerate(bucket.names) if name and self.project_pattern.search(name)]
        bucket.extra["projected"] = projected
        bucket.extra["anchors"] = [bucket.params[i].detach().clone() for i in projected]

    def _options(self):
        return {"gamma_eps": self.gamma_eps, "gamma_lr": self.gamma_lr, "gamma_range": self.gamma_range}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(self._anchors_in_buckets(state_dict))

    def _anchors_in_buckets(self, state_dict):
        """A state saved when the anchors were per-tensor state ("anchor"), as DiZO keeps them now: in its
        buckets. Any other state is returned as it is, for the checks to judge."""
        state, zo = (state_dict.get("state"), state_dict.get("zo")) if isinstance(state_dict, dict) else (None, None)
        if not (isinstance(state, dict) and isinstance(zo, dict) and zo.get("method") == {}
                and any(isinstance(s, dict) and "anchor" in s for s in state.values())):
            return state_dict
        index = {id(p): k for k, p in enumerate(p for group in self.param_groups for p in group["params"])}
        anchors = [[state.get(index[id(b.params[i])], {}).get("anchor") for i in b.extra["projected"]]
                   for b in self.buckets]
        if any(anchor is None for bucket in anchors for anchor in bucket):
            return state_dict
        rest = {k: {key: v for key, v in s.items() if key != "anchor"} for k, s in state.items()}
        return {**state_dict, "state": {k: s for k, s in rest.items() if s},
                "zo": {**zo, "method": {"anchors": anchors}}}

    def _after_step(self, closure, fresh_closure, record):
        if self.step_count % self.project_every:
            return
        if closure is None:
            if "rescale" in record:  # absent when the search failed and put the weights back
                self._rescale(record["rescale"])
        else:
            record["rescale"] = self.project(closure if fresh_closure is None else None, fresh_closure)

    def _projected(self):
        """(bucket, params, anchors, stream ids, shards) of the projected tensors, per bucket that has any."""
        for b in self.buckets:
            if b.extra["projected"]:
                idx = b.extra["projected"]
                yield (b, [b.params[i] for i in idx], b.extra["anchors"], [b.stream_ids[i] for i in idx],
                       [b.shards[i] for i in idx])

    @torch.no_grad()
    def project(self, closure=None, fresh_closure=None) -> list[list[float]]:
        """The projection search on all projected tensors (one host sync per iteration). Returns the final
        factors γ/t, per bucket (a host sync each), which replay applies instead of searching."""
        projected = list(self._projected())
        if not projected:
            return []
        if fresh_closure is None:
            warnings.warn("DiZO projection without fresh_closure: every iteration reuses the step's batch",
                          stacklevel=3)
            fresh_closure = lambda: closure  # noqa: E731
        seed = step_seed(self.seed, self.step_count)
        # In probe mode the probes are transient copies and θ is only read until the final rescale: no saved copy.
        probing = self.module_probes is not None
        work, where = [], []
        for bucket, params, anchors, ids, shards in projected:
            where.append(distributed.offsets(shards))
            t = distributed.distance_norms(params, anchors, shards,
                                           lambda p, a: ops.distance_norms(p, a, backend=self.backend))
            work.append((bucket, params, anchors, None if probing else [p.clone() for p in params], t, t.clone(), ids))
        try:
            self._search(work, seed, fresh_closure)
        except BaseException:  # a failed search leaves the weights as they were before it
            for _, params, _, saved, *_ in work:
                if saved is not None:
                    torch._foreach_copy_(params, saved)
            raise
        factors = []
        for (_, params, anchors, saved, t, gamma, ids), offsets in zip(work, where):
            factors.append(_ratio(gamma, t))
            self._project_from(params, anchors, saved, factors[-1], ids, offsets)
        return [f.tolist() for f in factors]

    def _project_from(self, params, anchors, saved, factors, ids, offsets) -> None:
        """θ = θ0 + (saved − θ0)·f, the projection's update: stored with the optimizer's rounding, keyed by a seed
        of its own, derived from the step's (so its rounding words are independent of every update's)."""
        ops.anchored_rescale_(params, anchors, factors, sources=saved, rounding=self.rounding,
                              seed=step_seed(step_seed(self.seed, self.step_count), 0), stream_ids=ids,
                              offsets=offsets, backend=self.backend)

    def _search(self, work, seed, fresh_closure) -> None:
        """The J iterations: each probes γ ± ε_γ·z on a fresh batch and updates γ in place."""
        tau, eg = self.gamma_range, self.gamma_eps
        for j in range(self.project_iters):
            probes = []
            for _, params, anchors, saved, t, gamma, ids in work:
                z = torch.stack([ops.fill_random_(torch.empty(1, device=t.device), seed, k, offset=j,
                                                  domain=Domain.DIZO, backend=self.backend)[0] for k in ids])
                z = torch.maximum(torch.minimum(z, tau / eg * t), -tau / eg * t)
                probes.append(z)
            losses, failure, batch = {}, None, None
            try:
                batch = fresh_closure()
            except BaseException as exc:
                if self.loss_reduction is None:
                    raise
                failure = exc  # raised after the all-reduce, which tells the other ranks
            for key, sign in (("plus", 1.0), ("minus", -1.0)):
                if batch is None or (failure is not None and not self.forwards_gather):
                    break  # with sharded weights, a failed rank still runs the forwards: every rank gathers
                try:
                    factors = [_ratio(gamma + sign * eg * z, t) for (*_, t, gamma, _), z in zip(work, probes)]
                    if self.module_probes is None:
                        for (_, params, anchors, saved, *_), f in zip(work, factors):
                            ops.anchored_rescale_(params, anchors, f, sources=saved, backend=self.backend)
                        loss = batch()
                    else:
                        loss = self._probed_search_forward(work, factors, batch)
                    if failure is None:
                        losses[key] = check_loss(loss, f"projection search iteration {j}")
                except BaseException as exc:
                    if self.loss_reduction is None:
                        raise
                    failure = failure or exc
            values, failure = self._probe_losses(losses, failure, ("plus", "minus"))
            if failure is not None:
                raise failure
            plus, minus = values["plus"], values["minus"]
            if not (math.isfinite(plus) and math.isfinite(minus)):
                self.nonfinite_steps += 1
                continue
            g = (plus - minus) / (2 * eg)
            for (_, params, anchors, saved, t, gamma, _), z in zip(work, probes):
                gamma.copy_(torch.minimum(torch.maximum(gamma - self.gamma_lr * t * g * z, (1 - tau) * t),
                                          (1 + tau) * t))

    def _probed_search_forward(self, work, factors, batch):
        """Probe mode: `batch()` with each projected tensor seen as θ0 + (θ − θ0)·f through a transient copy."""
        rescaled = {}
        for (bucket, _, anchors, _, _, _, _), f in zip(work, factors):
            for position, (i, anchor) in enumerate(zip(bucket.extra["projected"], anchors)):
                rescaled[(id(bucket), i)] = (anchor, f[position:position + 1])

        def probe(b, i, rows):
            if (id(b), i) not in rescaled:
                return None
            anchor, factor = rescaled[(id(b), i)]
            source = b.params[i] if rows is None else b.params[i][rows]
            copy = torch.empty_like(source, memory_format=torch.contiguous_format)
            ops.anchored_rescale_([copy], [anchor if rows is None else anchor[rows]], factor, sources=[source],
                                  backend=self.backend)
            return copy

        with self.module_probes.probing(probe):
            loss = batch()
            self.module_probes.check_seen([(bucket, i) for bucket, *_ in work for i in bucket.extra["projected"]])
        return loss

    def _rescale(self, factors: list[list[float]]) -> None:
        """Replay of a projection: the search's final rescale with its logged factors, from a saved copy as
        there (float32 factors survive the log exactly)."""
        for (_, params, anchors, ids, shards), f in zip(self._projected(), factors, strict=True):
            self._project_from(params, anchors, [p.clone() for p in params],
                               torch.tensor(f, dtype=torch.float32, device=params[0].device), ids,
                               distributed.offsets(shards))


def _ratio(gamma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """γ/t, and 1 where t = 0 (a tensor still at its anchor has no direction to rescale)."""
    return torch.where(t > 0, gamma / torch.where(t > 0, t, 1.0), 1.0)
