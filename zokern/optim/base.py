"""The machinery every zokern optimizer shares: step seeds, per-tensor stream ids, device buckets, the
± probes with one host synchronisation, non-finite losses, the two-pass mode, resumable state, and the
seed log: one small record per step from which `replay_step` redoes the step without forward passes.

A subclass says how to perturb (`_perturb`) and how to restore + update (`_update`); everything else
lives here once.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zokern.random import check_seed, parse_distribution, step_seed

# MeZO's rule: no weight decay on biases and norms [ALGORITHMS.md §0].
NO_DECAY = re.compile(r"bias|layer_norm|layernorm|norm\.weight|ln_\w*\.weight", re.IGNORECASE)


@dataclass
class Bucket:
    """The tensors of one param group on one device: what one fused op call covers."""
    params: list
    names: list
    stream_ids: list
    group: dict
    extra: dict = field(default_factory=dict)  # per-method buffers (masks, Hessians, subspaces)

    @property
    def weight_decays(self) -> list[float]:
        wd = self.group["weight_decay"]
        return [0.0 if name is not None and NO_DECAY.search(name) else wd for name in self.names]


class NonFiniteLossError(FloatingPointError):
    pass


def _read_losses(losses: dict) -> dict:
    """The step's losses as floats, with one host synchronisation for all of them."""
    device = next((v.device for v in losses.values() if isinstance(v, torch.Tensor)), "cpu")
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).detach().reshape(())
                           for v in losses.values()])
    return dict(zip(losses, stacked.tolist()))


class ZOOptimizer(torch.optim.Optimizer):
    """Base class. `closure()` evaluates the loss at the current weights, without autograd."""

    two_pass_supported = True
    forwards_per_step = 2

    @property
    def mean_forwards_per_step(self) -> float:
        """Forward passes per step on average, for equal-budget comparisons (DiZO adds its search)."""
        return float(self.forwards_per_step)

    def __init__(self, params, defaults: dict, *, eps: float, seed: int = 0, dist="normal",
                 backend: "str | None" = None, two_pass: bool = False, on_nonfinite: str = "skip"):
        if not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a positive finite number, got {eps}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if two_pass and not self.two_pass_supported:
            raise ValueError(f"{type(self).__name__} has no two-pass mode")
        self.eps, self.seed = float(eps), check_seed(seed)
        self.dist, self.backend = int(parse_distribution(dist)), backend
        self.two_pass, self.on_nonfinite = two_pass, on_nonfinite
        self.step_count = 0
        self.nonfinite_steps = 0
        self.pending_seed: "int | None" = None  # two-pass mode: the seed whose +εz the weights hold
        self._next_stream = 0
        self._used_streams: set[int] = set()
        self.buckets: list[Bucket] = []
        # Called with each step's record (docs/SEEDLOG.md), e.g. `opt.record_hook = records.append`.
        self.record_hook: "Callable[[dict], None] | None" = None
        super().__init__(params, defaults)

    # --- construction -----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        ids = [self._stream_id(name) for name in names]
        by_device: dict[torch.device, Bucket] = {}
        for p, name, k in zip(group["params"], names, ids):
            if not p.is_floating_point():
                raise TypeError(f"parameter {name or '#' + str(k)} has dtype {p.dtype}; ZO optimizers train "
                                "float32, bfloat16 or float16 tensors")
            bucket = by_device.setdefault(p.device, Bucket([], [], [], group))
            bucket.params.append(p)
            bucket.names.append(name)
            bucket.stream_ids.append(k)
        for bucket in by_device.values():
            self._init_bucket(bucket)
            self.buckets.append(bucket)

    def _stream_id(self, name: "str | None") -> int:
        """A parameter's stream id: from its name when the optimizer was given named parameters, so z does
        not depend on parameter order; else its position."""
        if name is None:
            k = self._next_stream
            self._next_stream += 1
        else:
            k = zlib.crc32(name.encode())
        if k in self._used_streams:
            raise ValueError(f"two parameters share stream id {k} (name {name!r}); give parameters unique names")
        self._used_streams.add(k)
        return k

    def _init_bucket(self, bucket: Bucket) -> None:
        """Per-method buffers for a new bucket."""

    # --- what a method defines ----------------------------------------------------------------------------

    def _perturb(self, seed: int, scale: float, first: bool) -> None:
        """θ += scale·P(seed) on every bucket; `first` marks the first pass of a step (at unperturbed θ)."""
        raise NotImplementedError

    def _measure(self, losses: dict) -> dict:
        """What the update needs from the step's losses besides ρ (HiZOO's curvature), as floats: it goes
        into the step's record, so replay needs no forward pass."""
        return {}

    def _update(self, seed: int, grad: float, next_seed: "int | None", record: dict) -> None:
        """From θ − εP(seed): restore, update with the projected gradient, and add +εP(next_seed) if given.
        `record` holds what `_measure` returned."""
        raise NotImplementedError

    def _after_step(self, closure, record: dict) -> None:
        """Work after the update (DiZO's projection). When replaying, `closure` is None and what the work
        decided is read from `record`; when training, it is written there."""

    # --- the step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        return self._step(closure, None)

    @torch.no_grad()
    def replay_step(self, record: dict) -> None:
        """Redo a logged step: the weight operations of training in the same order, with ρ, the learning
        rates and the method's measured quantities taken from `record` instead of forward passes. On the
        same backend, from the same weights and optimizer configuration, the result is bitwise the trained
        one."""
        seed = step_seed(self.seed, self.step_count)
        if record["step"] != self.step_count or record["seed"] != seed:
            raise ValueError(f"record of step {record['step']} (seed {record['seed']}) does not follow step "
                             f"{self.step_count} (seed {seed}): wrong log, or a different base seed")
        for group, lr, wd in zip(self.param_groups, record["lr"], record["weight_decay"], strict=True):
            group["lr"], group["weight_decay"] = lr, wd
        if self.pending_seed is not None and not record.get("pending"):
            self.restore_weights()  # training took the weights out of two-pass mode's +εz before this step
        self._step(None, record)

    def _step(self, closure, logged: "dict | None"):
        """One step, shared by training (`closure`: measure the losses, emit the record) and replay
        (`logged`: the record measured in training); both run the same weight operations."""
        forward = closure or (lambda: None)
        emit = (self.record_hook if logged is None else None) or (lambda record: None)
        seed = step_seed(self.seed, self.step_count)
        record = logged or {"step": self.step_count, "seed": seed,
                            "lr": [float(g["lr"]) for g in self.param_groups],
                            "weight_decay": [float(g["weight_decay"]) for g in self.param_groups]}
        if self.two_pass and logged is None:
            record["pending"] = self.pending_seed == seed
        losses = {}
        if self.forwards_per_step == 3:
            losses["center"] = forward()
        if self.pending_seed != seed:
            self._perturb(seed, self.eps, first=True)
        losses["plus"] = forward()
        self._perturb(seed, -2 * self.eps, first=False)
        losses["minus"] = forward()
        if logged is None:
            values = _read_losses(losses)
            if all(math.isfinite(v) for v in values.values()):
                record["grad"] = (values["plus"] - values["minus"]) / (2 * self.eps)
                record.update(self._measure(values))
            else:
                record["skipped"] = True
        if record.get("skipped"):
            self._perturb(seed, self.eps, first=False)  # back to θ, nothing applied
            self.pending_seed = None
            self.nonfinite_steps += 1
            self.step_count += 1
            emit(record)
            if logged is None:
                message = (f"non-finite loss at step {self.step_count - 1}: {values}; weights restored, "
                           "no update applied")
                if self.on_nonfinite == "raise":
                    raise NonFiniteLossError(message)
                warnings.warn(f"{message} ({self.nonfinite_steps} such steps so far)", RuntimeWarning,
                              stacklevel=3)
            return losses["plus"]
        next_seed = step_seed(self.seed, self.step_count + 1) if self.two_pass else None
        self._update(seed, record["grad"], next_seed, record)
        self.pending_seed = next_seed
        self.step_count += 1
        self._after_step(closure, record)
        emit(record)
        return losses["plus"]

    # --- two-pass mode ------------------------------------------------------------------------------------

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Take the next step's +εz out of the weights (two-pass mode) before evaluating or saving them;
        the next step perturbs again itself."""
        if self.pending_seed is not None:
            self._perturb(self.pending_seed, -self.eps, first=False)
            self.pending_seed = None

    @contextlib.contextmanager
    def unperturbed(self):
        """`with opt.unperturbed(): evaluate()` — the weights are the trained ones inside the block."""
        self.restore_weights()
        yield

    # --- state --------------------------------------------------------------------------------------------

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["zo"] = {"seed": self.seed, "eps": self.eps, "step_count": self.step_count,
                       "nonfinite_steps": self.nonfinite_steps, "pending_seed": self.pending_seed,
                       "method": self._extra_state()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo")
        index = {id(group): i for i, group in enumerate(self.param_groups)}
        groups = [index[id(b.group)] for b in self.buckets]
        super().load_state_dict(state_dict)
        for b, i in zip(self.buckets, groups):
            b.group = self.param_groups[i]  # torch replaced the group dicts: follow them (lr, schedulers)
        self.seed, self.eps, self.step_count = zo["seed"], zo["eps"], zo["step_count"]
        self.nonfinite_steps, self.pending_seed = zo["nonfinite_steps"], zo["pending_seed"]
        self._load_extra_state(zo["method"])
