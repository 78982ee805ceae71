"""The machinery every zokern optimizer shares: step seeds, per-tensor stream ids, device buckets, the
± probes with one host synchronisation, non-finite losses, the two-pass mode, resumable state, and the
seed log: one small record per step from which `replay_step` redoes the step without forward passes.

A subclass says how to perturb (`_perturb`), how to restore + update (`_update`) and, for probe mode
(zokern/optim/probe.py), how to make one tensor's perturbed copy (`_probe`); it keeps its buffers in
`Bucket.extra` (those in `saved_buffers` are its state), and states its capabilities as class attributes
(`two_pass_supported`, `weight_decay_supported`, `forwards_per_step`, `trains_tied_embeddings`) and properties
(`fresh_batches_per_search`, from which `uses_fresh_batches` follows), which callers read instead of naming
methods; everything else lives here once.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zokern import distributed
from zokern.optim.probe import ModuleProbes
from zokern.random import check_seed, parse_distribution, step_seed
from zokern.validation import Rounding, check_step_args, parse_rounding

# MeZO's rule: no weight decay on biases and norms [ALGORITHMS.md §0].
NO_DECAY = re.compile(r"bias|layer_norm|layernorm|norm\.weight|ln_\w*\.weight", re.IGNORECASE)


@dataclass
class Bucket:
    """The tensors of one param group on one device: what one fused op call covers."""
    params: list
    names: list
    stream_ids: list
    group: dict
    # The method's buffers (masks, Hessians, anchors, subspaces): their one home. The optimizer's
    # `saved_buffers` name those that are its state; the others are fixed at construction or are caches.
    extra: dict = field(default_factory=dict)
    # Per tensor: where a sharded parameter's local tensor (in `params`) sits in the whole (None: whole).
    shards: list = field(default_factory=list)
    # Per tensor: the parameter as given, which the model's modules hold (a sharded one's DTensor; else params[i]).
    given: list = field(default_factory=list)

    @property
    def offsets(self) -> "list[int] | None":
        """The stream index of each tensor's element 0 (its shard's global start), or None when none is sharded."""
        return self.offsets_at(range(len(self.params)))

    def offsets_at(self, indices) -> "list[int] | None":
        """`offsets` of the tensors at `indices` (a method's subset of the bucket)."""
        return distributed.offsets([self.shards[i] for i in indices])

    def shape(self, i: int) -> torch.Size:
        """Tensor i's whole shape (a shard's parameter's, not the shard's)."""
        return self.params[i].shape if self.shards[i] is None else self.shards[i].shape

    @property
    def weight_decays(self) -> list[float]:
        wd = self.group["weight_decay"]
        return [0.0 if name is not None and NO_DECAY.search(name) else wd for name in self.names]


class NonFiniteLossError(FloatingPointError):
    pass


class RankFailedError(RuntimeError):
    """Another rank's closure failed in this step: this rank skipped it too."""


def check_loss(value, where: str):
    """The closure's return value if it is a loss: a real number or a one-element tensor, or under data
    parallel `(loss, count)`, count being the size of the rank's share of the batch. Checked at each
    forward, so junk is caught before the next pass moves the weights."""
    if isinstance(value, tuple) and len(value) == 2:
        count = value[1]
        if not isinstance(count, numbers.Real) or isinstance(count, bool) or not count >= 0 or math.isinf(count):
            raise ValueError(f"the closure returned (loss, {count!r}) at {where}; the count must be the number of "
                             "examples of the rank's share, a finite number >= 0")
        if isinstance(value[0], tuple):
            raise TypeError(f"the closure returned a nested tuple at {where}; expected (loss, count)")
        return check_loss(value[0], where), count
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"the closure returned a {value.dtype} tensor at {where}; expected the loss, "
                            "a real number or one-element tensor")
        if value.numel() != 1:
            raise ValueError(f"the closure returned a tensor of shape {tuple(value.shape)} at {where}; expected "
                             "the loss, a one-element tensor (reduce it, e.g. with .mean())")
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    raise TypeError(f"the closure returned {type(value).__name__} {value!r:.60} at {where}; expected the loss, "
                    "a real number or one-element tensor")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _check_like(saved, mine, where: str) -> None:
    """A loaded state must have the structure of the optimizer's own: the same keys and lengths, and
    tensors of the same shapes. None on either side is a buffer made lazily (SparseMeZO's thresholds)."""
    if saved is None or mine is None:
        return
    if isinstance(mine, torch.Tensor) or isinstance(saved, torch.Tensor):
        if not (isinstance(mine, torch.Tensor) and isinstance(saved, torch.Tensor)):
            raise ValueError(f"{where} is a {type(saved).__name__} in the state_dict; this optimizer keeps a "
                             f"{type(mine).__name__}")
        if saved.shape != mine.shape:
            raise ValueError(f"{where} has shape {tuple(saved.shape)} in the state_dict; this optimizer's has "
                             f"shape {tuple(mine.shape)}")
    elif isinstance(mine, dict):
        if not isinstance(saved, dict) or saved.keys() != mine.keys():
            have = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{where} holds {have} in the state_dict; this optimizer keeps {sorted(mine)}")
        for key in mine:
            _check_like(saved[key], mine[key], f"{where}[{key!r}]")
    elif isinstance(mine, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(mine):
            have = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
            raise ValueError(f"{where} has {have} entries in the state_dict; this optimizer has {len(mine)}")
        for i, (s, m) in enumerate(zip(saved, mine)):
            _check_like(s, m, f"{where}[{i}]")


def _weighted(value) -> tuple:
    """A checked loss as (loss, weight): a bare loss weighs 1 (an equal share)."""
    return value if isinstance(value, tuple) else (value, 1.0)


def _read_losses(losses: dict) -> dict:
    """The step's losses as floats, with one host synchronisation for all of them."""
    losses = {key: _weighted(value)[0] for key, value in losses.items()}
    device = next((v.device for v in losses.values() if isinstance(v, torch.Tensor)), "cpu")
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).detach().reshape(())
                           for v in losses.values()])
    return dict(zip(losses, stacked.tolist()))


def _restored(mine, saved, device):
    """A saved buffer as the bucket keeps it: copied into the optimizer's own tensors (their dtype and device),
    a tensor the optimizer makes lazily moved to the bucket's device, anything else taken as saved."""
    if isinstance(mine, torch.Tensor) and saved is not None:
        return mine.copy_(saved)
    if isinstance(saved, torch.Tensor):
        return saved.to(device)
    if isinstance(mine, list) and isinstance(saved, (list, tuple)):
        return [_restored(m, s, device) for m, s in zip(mine, saved)]
    return saved


class ZOOptimizer(torch.optim.Optimizer):
    """Base class. `closure()` evaluates the loss at the current weights, without autograd.

    Capabilities, read from the class by `zokern finetune` and `ZOTrainer` (which leaves a tied embedding to
    its user: freeze it where `trains_tied_embeddings` is False):
    two_pass_supported: `two_pass=True` is accepted.
    weight_decay_supported: the constructor takes `weight_decay`.
    forwards_per_step: closure calls per step.
    uses_fresh_batches: a step may call `fresh_closure` (see `step`), at most `fresh_batches_per_search` times
    (a method says so by that property alone).
    trains_tied_embeddings: False if the method leaves a token embedding tied to the output layer untrained.
    updates_low_rank: the method moves its matrices by `lowrank_apply_` (what a replay of an older log may meet).
    """

    two_pass_supported = True
    weight_decay_supported = True
    forwards_per_step = 2
    trains_tied_embeddings = True
    updates_low_rank = False
    # Keys of Bucket.extra that are the method's state: saved by state_dict, checked and restored on loading.
    saved_buffers: tuple[str, ...] = ()
    # The record entries `_measure` adds to an applied step (HiZOO's curvature): what replay cannot do without.
    measured: tuple[str, ...] = ()

    @property
    def mean_forwards_per_step(self) -> float:
        """Forward passes per step on average, for equal-budget comparisons (DiZO adds its search)."""
        return float(self.forwards_per_step)

    @property
    def fresh_batches_per_search(self) -> int:
        """The most fresh batches one step draws from `fresh_closure` (0: it never calls it)."""
        return 0

    @property
    def uses_fresh_batches(self) -> bool:
        return self.fresh_batches_per_search > 0

    @classmethod
    def option_names(cls) -> set[str]:
        """The keyword arguments the constructor takes, following **options up to the base classes."""
        names: set = set()
        for klass in cls.__mro__:
            if "__init__" not in vars(klass):
                continue
            parameters = inspect.signature(klass.__init__).parameters.values()
            names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
        return names - {"self", "params", "defaults"}

    def __init__(self, params, defaults: dict, *, eps: float, seed: int = 0, dist="normal",
                 backend: "str | None" = None, two_pass: bool = False, on_nonfinite: str = "skip",
                 rounding: "str | None" = None, process_group=None):
        # A model instead of parameters: train its parameters with requires_grad=True, in probe mode.
        model = params if isinstance(params, torch.nn.Module) else None
        if model is not None:
            params = list(model.named_parameters())
        if not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a positive finite number, got {eps}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if two_pass and not self.two_pass_supported:
            raise ValueError(f"{type(self).__name__} has no two-pass mode")
        self.eps, self.seed = float(eps), check_seed(seed)
        self.dist, self.backend = int(parse_distribution(dist)), backend
        # How updates are stored (docs/OPS.md): None is stochastic, which float32 storage ignores, so it means
        # stochastic for 16-bit tensors and nearest for float32 ones.
        self.rounding = parse_rounding("stochastic" if rounding is None else rounding).name.lower()
        self.two_pass, self.on_nonfinite = two_pass, on_nonfinite
        # Data parallel: the losses are averaged over this group's ranks (docs/DISTRIBUTED.md).
        self.loss_reduction = distributed.loss_reduction(process_group)
        self.step_count = 0
        self.nonfinite_steps = 0
        self.pending_seed: "int | None" = None  # two-pass mode: the seed whose +εz the weights hold
        self._next_stream = 0
        self._used_streams: set[int] = set()
        self.buckets: list[Bucket] = []
        # Called with each step's record (docs/SEEDLOG.md), e.g. `opt.record_hook = records.append`.
        self.record_hook: "Callable[[dict], None] | None" = None
        self.module_probes: "ModuleProbes | None" = None  # probe mode's hooks on the model (attach)
        super().__init__(params, defaults)
        if not any(b.params for b in self.buckets):
            raise ValueError(f"every parameter given to {type(self).__name__} has requires_grad=False: nothing to "
                             "train (pass the tensors to train, e.g. a PEFT model's adapters)")
        if any(any(b.shards) for b in self.buckets) and self.loss_reduction is None:
            raise distributed.DistributedError(
                "sharded parameters need the losses averaged over the ranks: leave process_group=None (the "
                "default group) or pass the data-parallel group, not False")
        if self.loss_reduction is not None:
            group = self.loss_reduction.group
            distributed.check_same_on_ranks(
                {"optimizer": type(self).__name__, "seed": self.seed, "eps": self.eps, "tensors": self._tensors()},
                group, f"the {type(self).__name__} optimizer")
        if model is not None:
            self.attach(model)

    # --- probe mode ---------------------------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> "ZOOptimizer":
        """Probe mode: the step's forward passes see θ ± εP through transient copies made as `model`'s modules
        run, and only the update writes the trained tensors (docs/OPTIMIZERS.md). Checked before anything
        changes: every trained tensor is a parameter of a module of `model`. Returns the optimizer."""
        if self.two_pass:
            raise ValueError("probe mode never leaves the weights perturbed between steps: it has no two-pass mode")
        if type(self)._probe is ZOOptimizer._probe:
            raise ValueError(f"{type(self).__name__} defines no probe copies (_probe): it has no probe mode")
        probes = ModuleProbes(self, model)
        self.detach()
        self.module_probes = probes
        return self

    def detach(self) -> None:
        """Leave probe mode: the hooks are removed, and the next step perturbs the weights in place."""
        if self.module_probes is not None:
            self.module_probes.remove()
            self.module_probes = None

    # --- construction -----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            self._check_rates({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Frozen tensors are not trained, as torch optimizers leave tensors without gradients alone: they are
        # dropped from the group, so they are neither perturbed nor in the state.
        trained = [i for i, p in enumerate(group["params"]) if p.requires_grad]
        group["params"] = [group["params"][i] for i in trained]
        if "param_names" in group:
            group["param_names"] = [group["param_names"][i] for i in trained]
        names = group.get("param_names") or [None] * len(group["params"])
        ids = [self._stream_id(name) for name in names]
        by_device: dict[torch.device, Bucket] = {}
        for p, name, k in zip(group["params"], names, ids):
            if not p.is_floating_point():
                raise TypeError(f"parameter {name or '#' + str(k)} has dtype {p.dtype}; ZO optimizers train "
                                "float32, bfloat16 or float16 tensors")
            # A sharded parameter (FSDP2) is trained through its local shard, on global stream offsets.
            local, shard = distributed.local_shard(p, name or f"#{k}")
            bucket = by_device.setdefault(local.device, Bucket([], [], [], group))
            bucket.params.append(local)
            bucket.given.append(p)
            bucket.shards.append(shard)
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

    def _options(self) -> dict:
        """The method's real-valued options, checked with the rates before each step."""
        return {}

    def _check_rates(self, group: dict) -> None:
        """The rates of a param group and the method's options, as the ops check them: run before any
        weight moves, so a NaN or out-of-range value (constructor, scheduler, loaded state) changes nothing."""
        check_step_args(seed=self.seed, dist=self.dist, lr=group["lr"], weight_decay=group["weight_decay"],
                        eps=self.eps, **self._options())

    # --- what a method defines ----------------------------------------------------------------------------

    def _perturb(self, seed: int, scale: float, first: bool) -> None:
        """θ += scale·P(seed) on every bucket; `first` marks the first pass of a step (at unperturbed θ)."""
        raise NotImplementedError

    def _measure(self, losses: dict) -> dict:
        """What the update needs from the step's losses besides ρ (HiZOO's curvature), as floats: it goes
        into the step's record, so replay needs no forward pass."""
        return {}

    def _update(self, seed: int, grad: float, next_seed: "int | None", record: dict, restore: float) -> None:
        """From θ − restore·P(seed): restore, update with the projected gradient, and add +εP(next_seed) if
        given. `restore` is ε, or 0 in probe mode, where the weights hold θ. `record` holds what `_measure`
        returned."""
        raise NotImplementedError

    def _probe(self, bucket: Bucket, i: int, seed: int, scale: float, rows: "torch.Tensor | None") -> torch.Tensor:
        """Probe mode: a new tensor θ + scale·P(seed) of the bucket's tensor i, with the z of the in-place path;
        with `rows` (sorted, unique), only those rows of a table, stacked. The stored tensor is not written."""
        raise NotImplementedError

    def _begin_probes(self, seed: int) -> None:
        """Probe mode: what the first in-place perturbation pass does besides perturbing (SparseMeZO's mask)."""

    def _complete_record(self, record: dict) -> None:
        """Training: what the method adds to the record of a step that happened (applied or skipped) as it is
        logged; a step that did not happen (its closure failed before any weight moved) logs nothing."""

    def _after_step(self, closure, fresh_closure, record: dict) -> None:
        """Work after the update (DiZO's projection). When replaying, `closure` is None and what the work
        decided is read from `record`; when training, it is written there."""

    # --- the step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, fresh_closure=None):
        """One ZO step; returns the loss at θ + εz. `closure()` evaluates the loss on the step's batch.
        `fresh_closure`, optional: `fresh_closure()` returns a new closure on a new batch, for methods whose
        step also evaluates other batches (`uses_fresh_batches`: DiZO's projection search); the others
        ignore it, so a caller may always pass it."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        return self._step(closure, None, fresh_closure)

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
        rates = list(zip(record["lr"], record["weight_decay"], strict=True))
        if len(rates) != len(self.param_groups):
            raise ValueError(f"record of step {record['step']} has rates for {len(rates)} param groups; this "
                             f"optimizer has {len(self.param_groups)}")
        for lr, wd in rates:
            self._check_rates({"lr": lr, "weight_decay": wd})
        for group, (lr, wd) in zip(self.param_groups, rates):
            group["lr"], group["weight_decay"] = lr, wd
        if self.pending_seed is not None and not record.get("pending"):
            self.restore_weights()  # training took the weights out of two-pass mode's +εz before this step
        self._step(None, record, None)

    def _step(self, closure, logged: "dict | None", fresh_closure):
        """One step, shared by training (`closure`: measure the losses, emit the record) and replay
        (`logged`: the record measured in training); both run the same weight operations.

        Transactional: the rates are checked before any weight moves. A closure that raises or returns no
        loss ends the step as a skipped step (same weight operations, so the same bits, and a record that
        replays them), then the error is raised again; if no weight had moved yet, the step did not happen."""
        hook = self.record_hook if logged is None else None

        def emit(record: dict) -> None:
            if logged is None:
                self._complete_record(record)
            if hook is not None:
                hook(record)

        seed = step_seed(self.seed, self.step_count)
        for group in self.param_groups:
            self._check_rates(group)
        record = logged or {"step": self.step_count, "seed": seed,
                            "lr": [float(g["lr"]) for g in self.param_groups],
                            "weight_decay": [float(g["weight_decay"]) for g in self.param_groups]}
        if self.two_pass and logged is None:
            record["pending"] = self.pending_seed == seed
        # Probe mode is the record's when replaying: its update restores nothing.
        probing = self.module_probes is not None if logged is None else bool(logged.get("probed"))
        if probing and logged is None:
            record["probed"] = True
        losses, failure, moved = {}, None, False

        def evaluate(where: str, scale: "float | None" = None) -> None:
            nonlocal failure
            if closure is None or (failure is not None and not self.forwards_gather):
                return
            try:
                if scale is None:
                    value = closure()
                else:  # probe mode: nothing is written, so a failure leaves the step undone
                    with self.module_probes.probing(lambda b, i, rows: self._probe(b, i, seed, scale, rows)):
                        value = closure()
                        self.module_probes.check_seen([(b, i) for b in self.buckets for i in range(len(b.params))])
                if failure is None:
                    losses[where] = check_loss(value, f"the {where} forward")
            except BaseException as exc:
                # Under data parallel every rank must reach the step's all-reduce, which carries the failure.
                if not moved and self.loss_reduction is None:
                    raise
                failure = failure or exc

        if self.forwards_per_step == 3:
            evaluate("center")
        if probing:
            self._begin_probes(seed)
            evaluate("plus", self.eps)
            evaluate("minus", -self.eps)
        else:
            if self.pending_seed != seed:
                self._perturb(seed, self.eps, first=True)
                moved = True
            evaluate("plus")
            self._perturb(seed, -2 * self.eps, first=False)
            moved = True
            evaluate("minus")
        if logged is None:
            values, failure = self._probe_losses(losses, failure)
        if failure is not None:
            record.update(skipped=True, failed=_describe(failure))
        elif logged is None:
            if all(math.isfinite(v) for v in values.values()):
                record["grad"] = (values["plus"] - values["minus"]) / (2 * self.eps)
                record.update(self._measure(values))
                try:  # lr·ρ·z must fit float32 in every group before any group's update is written
                    for group in self.param_groups:
                        check_step_args(seed=seed, dist=self.dist, lr=group["lr"], grad=record["grad"])
                except ValueError as exc:
                    failure = exc
                    record.update(skipped=True, failed=_describe(exc))
            else:
                record["skipped"] = True
        if record.get("skipped"):
            if not probing:
                self._perturb(seed, self.eps, first=False)  # back to θ, nothing applied
            self.pending_seed = None
            self.nonfinite_steps += "failed" not in record
            self.step_count += 1
            emit(record)
            if failure is not None:
                raise failure
            if logged is None:
                message = (f"non-finite loss at step {self.step_count - 1}: {values}; weights restored, "
                           "no update applied")
                if self.on_nonfinite == "raise":
                    raise NonFiniteLossError(message)
                warnings.warn(f"{message} ({self.nonfinite_steps} such steps so far)", RuntimeWarning,
                              stacklevel=3)
            return self._step_loss(losses, values if logged is None else None)
        next_seed = step_seed(self.seed, self.step_count + 1) if self.two_pass else None
        self._update(seed, record["grad"], next_seed, record, restore=0.0 if probing else self.eps)
        self.pending_seed = next_seed
        self.step_count += 1
        try:
            self._after_step(closure, fresh_closure, record)
        except BaseException as exc:  # the update stands; the record says what failed after it
            record["failed"] = _describe(exc)
            emit(record)
            raise
        emit(record)
        return self._step_loss(losses, values if logged is None else None)

    def _probe_losses(self, losses: dict, failure, keys: "tuple[str, ...] | None" = None):
        """(the losses as floats, the failure): read with one host synchronisation, or under data parallel
        averaged over the ranks by one all-reduce, which every rank joins, failed or not, and which tells
        each rank whether another one failed (then this rank's failure is a RankFailedError)."""
        if self.loss_reduction is None:
            return (None if failure is not None else _read_losses(losses)), failure
        keys = keys or (("center",) if self.forwards_per_step == 3 else ()) + ("plus", "minus")
        values, failed = self.loss_reduction.reduce({k: _weighted(v) for k, v in losses.items()}, keys,
                                                    failure is not None)
        if failure is None and failed:
            failure = RankFailedError(f"the closure failed on {failed} of {self.loss_reduction.world_size} ranks; "
                                      "this rank skipped the step with them")
        return values, failure

    def _step_loss(self, losses: dict, values: "dict | None"):
        """What `step` returns: the loss at θ + εz, under data parallel the mean over the ranks."""
        if self.loss_reduction is not None and values is not None:
            return torch.tensor(values["plus"], dtype=torch.float64)
        return _weighted(losses["plus"])[0] if "plus" in losses else None

    @property
    def forwards_gather(self) -> bool:
        """Whether the model's forwards run collectives (FSDP2's all-gathers of sharded parameters): then a rank
        whose closure failed still runs the step's remaining forwards, so that every rank joins them."""
        return any(any(b.shards) for b in self.buckets)

    @property
    def world_size(self) -> int:
        """The ranks this optimizer's steps average over (1: it trains alone)."""
        return 1 if self.loss_reduction is None else self.loss_reduction.world_size

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
        return {key: [b.extra[key] for b in self.buckets] for key in self.saved_buffers}

    def _load_extra_state(self, extra: dict) -> None:
        for key in self.saved_buffers:
            for b, saved in zip(self.buckets, extra[key]):
                b.extra[key] = _restored(b.extra[key], saved, b.params[0].device)

    def _tensors(self) -> list:
        """[name, shape] of every trained tensor, per param group: what a state belongs to."""
        return [[[name, list(p.shape)] for name, p in zip(g.get("param_names") or [None] * len(g["params"]),
                                                          g["params"])] for g in self.param_groups]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["zo"] = {"seed": self.seed, "eps": self.eps, "step_count": self.step_count, "rounding": self.rounding,
                       "nonfinite_steps": self.nonfinite_steps, "pending_seed": self.pending_seed,
                       "world_size": self.world_size, "method": self._extra_state(), "optimizer": type(self).__name__,
                       "tensors": self._tensors()}
        return state

    def _check_state(self, state_dict: dict) -> None:
        """Reject a state that is not this optimizer's (another method, other tensors, other buffer shapes),
        naming what differs, before anything is loaded. States saved before the optimizer and its tensors
        were recorded are checked on what they hold: group sizes, per-tensor state and method buffers."""
        me = type(self).__name__
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("zo"), dict):
            raise ValueError(f"not a zokern optimizer state_dict (no 'zo' entry); {me} cannot load it")
        zo = state_dict["zo"]
        missing = {"seed", "eps", "step_count", "nonfinite_steps", "pending_seed", "method"} - zo.keys()
        if missing:
            raise ValueError(f"the state_dict's 'zo' entry lacks {sorted(missing)}")
        if zo.get("optimizer", me) != me:
            raise ValueError(f"the state_dict was saved by {zo['optimizer']}; this optimizer is {me}")
        check_seed(zo["seed"])
        parse_rounding(zo.get("rounding", "nearest"))
        if zo.get("world_size", 1) != self.world_size:
            raise ValueError(f"the state_dict was saved by a run on {zo.get('world_size', 1)} ranks; this optimizer "
                             f"runs on {self.world_size}: resume on the world size it was saved on")
        if not zo["eps"] > 0 or not math.isfinite(zo["eps"]):
            raise ValueError(f"the state_dict's eps must be a positive finite number, got {zo['eps']}")
        groups, mine = state_dict.get("param_groups", []), self._tensors()
        if len(groups) != len(mine):
            raise ValueError(f"the state_dict has {len(groups)} param groups; this optimizer has {len(mine)}")
        for i, (group, tensors) in enumerate(zip(groups, mine)):
            if len(group["params"]) != len(tensors):
                raise ValueError(f"param group {i} has {len(group['params'])} tensors in the state_dict; this "
                                 f"optimizer's has {len(tensors)}")
            self._check_rates(group)
        for i, (saved, tensors) in enumerate(zip(zo.get("tensors", mine), mine)):
            for j, (theirs, ours) in enumerate(zip(saved, tensors)):
                if list(theirs) != ours:
                    raise ValueError(f"tensor {j} of param group {i} is {theirs[0]!r} of shape {tuple(theirs[1])} "
                                     f"in the state_dict; this optimizer's is {ours[0]!r} of shape {tuple(ours[1])}")
        names = [name or f"#{k}" for k, (name, _) in enumerate(t for tensors in mine for t in tensors)]
        saved_state, my_state = state_dict.get("state", {}), super().state_dict()["state"]
        for k in sorted(set(saved_state) | set(my_state), key=str):
            label = names[k] if isinstance(k, int) and k < len(names) else k
            where = f"the state of tensor {label!r}"
            _check_like(saved_state.get(k, {}), my_state.get(k, {}), where)
        _check_like(zo["method"], self._extra_state(), f"the {me} state")

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_state(state_dict)
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo")
        index = {id(group): i for i, group in enumerate(self.param_groups)}
        groups = [index[id(b.group)] for b in self.buckets]
        super().load_state_dict(state_dict)
        for b, i in zip(self.buckets, groups):
            b.group = self.param_groups[i]  # torch replaced the group dicts: follow them (lr, schedulers)
        self.seed, self.eps, self.step_count = zo["seed"], zo["eps"], zo["step_count"]
        # A state saved before rounding was recorded was trained with round-to-nearest.
        self.rounding = parse_rounding(zo.get("rounding", Rounding.NEAREST)).name.lower()
        self.nonfinite_steps, self.pending_seed = zo["nonfinite_steps"], zo["pending_seed"]
        self._load_extra_state(zo["method"])
