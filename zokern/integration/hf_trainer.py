"""`ZOTrainer`: a Hugging Face `transformers.Trainer` that trains with a zokern optimizer.

Trainer still owns the loop (data, scheduler, logging, evaluation, checkpoints, callbacks); ZOTrainer changes
three things: `create_optimizer` builds the zokern optimizer, `training_step` runs a whole ZO step (forward
passes only, model in eval mode, no autograd), and evaluation, prediction and saving see the unperturbed
weights of two-pass mode. docs/HF_TRAINER.md lists which TrainingArguments apply.
"""
from __future__ import annotations

import contextlib
import functools
import itertools

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from zokern.optim import METHODS, ZOOptimizer
from zokern.random import step_seed

# Options set through TrainingArguments, not zo_options.
_FROM_ARGS = {"lr": "learning_rate", "weight_decay": "weight_decay", "seed": "seed"}


@functools.cache
def _trainer_stepped(cls: type) -> type:
    """`cls` whose closure-less `step()` does nothing: Trainer calls `optimizer.step()` after `training_step`,
    which has already run the ZO step (it needs the batch)."""

    class TrainerStepped(cls):
        def step(self, closure=None, fresh_closure=None):
            return None if closure is None else super().step(closure, fresh_closure)

    TrainerStepped.__name__ = TrainerStepped.__qualname__ = cls.__name__
    return TrainerStepped


class _RestoreAtEpochEnd(TrainerCallback):
    """Two-pass mode: take the pending +εz out at every epoch end, which Trainer reaches before it loads the
    best model or returns from `train()` (the next step re-applies it)."""

    def __init__(self, trainer: "ZOTrainer"):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.zo_optimizer is not None:
            self.trainer.zo_optimizer.restore_weights()


class ZOTrainer(Trainer):
    """A `Trainer` whose steps are zeroth-order steps of a zokern optimizer.

    zo_method: a name in zokern.optim.METHODS ("mezo", "subzero", ...) or a `ZOOptimizer` subclass.
    zo_options: the optimizer's other keywords (eps, two_pass, backend, rank, ...). lr, weight_decay and
    seed come from TrainingArguments (learning_rate, weight_decay, seed); note that Trainer's default
    learning_rate 5e-5 is far above ZO's usual 1e-7 to 1e-6.
    zo_probes: probe mode (`opt.attach(model)`: the forwards see θ ± εP through transient copies, only the
    update writes the weights). None (default): on when a trained tensor is bfloat16 or float16 and two_pass
    is not set.

    The optimizer trains the model's parameters with requires_grad=True (the LoRA tensors of a PEFT model).
    Under torchrun (world_size > 1) every process evaluates its own batches and the optimizer averages the
    losses over the processes before each update (one all-reduce of a few scalars), so every process applies
    the same update; Trainer's batches are per device, so the global batch is world_size times as large.
    Each step calls `compute_loss` under `torch.no_grad()` with the model in eval mode; with
    gradient_accumulation_steps = k the step's loss is the mean over its k micro-batches, all evaluated
    at the same perturbation. The logged loss is the one `opt.step` returns (at θ + εz).
    """

    def __init__(self, *args, zo_method: "str | type" = "mezo", zo_options: "dict | None" = None,
                 zo_probes: "bool | None" = None, **kwargs):
        self.zo_class = _resolve_method(zo_method)
        self.zo_options = dict(zo_options or {})
        if zo_probes and self.zo_options.get("two_pass"):
            raise ValueError("zo_probes=True: probe mode never leaves the weights perturbed, so it has no two_pass")
        self.zo_probes = zo_probes
        clash = sorted(set(self.zo_options) & set(_FROM_ARGS))
        if clash:
            raise ValueError(f"zo_options {clash} come from TrainingArguments: set "
                             f"{', '.join(_FROM_ARGS[k] for k in clash)} there")
        self.zo_optimizer: "ZOOptimizer | None" = None
        self._micro_batches: list = []
        self._probe_loader = None
        super().__init__(*args, **kwargs)
        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ValueError("ZOTrainer builds its own zokern optimizer: choose it with zo_method and zo_options "
                             "instead of optimizers= or optimizer_cls_and_kwargs=")
        _check_args(self.args, self)
        if self.args.weight_decay and not self.zo_class.weight_decay_supported:
            raise ValueError(f"{self.zo_class.__name__} has no weight decay; set weight_decay=0")
        unknown = sorted(set(self.zo_options) - self.zo_class.option_names())
        if unknown:
            raise ValueError(f"zo_options {unknown}: {self.zo_class.__name__} takes "
                             f"{', '.join(sorted(self.zo_class.option_names() - set(_FROM_ARGS)))}")
        self.add_callback(_RestoreAtEpochEnd(self))

    # --- the optimizer ------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            if not trainable:
                raise ValueError("the model has no parameter with requires_grad=True to train")
            options = dict(self.zo_options, lr=self.args.learning_rate, seed=self.args.seed)
            if self.args.weight_decay:
                options["weight_decay"] = self.args.weight_decay
            optimizer = _trainer_stepped(self.zo_class)(trainable, **options)
            probes = self.zo_probes
            if probes is None:
                probes = not options.get("two_pass") and any(p.dtype != torch.float32 for _, p in trainable)
            if probes:
                optimizer.attach(model)
            self.optimizer = self.zo_optimizer = optimizer
        return self.optimizer

    # --- the step -----------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.eval()  # dropout off: both probes must see the same network
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            # Not the last micro-batch of the step: nothing to log yet, the step's loss comes once at its end.
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        fresh = self._fresh_closure(model) if self.zo_optimizer.uses_fresh_batches else None
        loss = self.zo_optimizer.step(lambda: self._zo_loss(model, batches), fresh)
        return loss.detach().to(self.args.device)

    def _zo_loss(self, model, batches: list) -> torch.Tensor:
        with torch.no_grad(), self.compute_loss_context_manager():
            losses = [self.compute_loss(model, batch) for batch in batches]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _fresh_closure(self, model):
        """The step's `fresh_closure` (DiZO's search): once t steps have run, fresh batches are the first
        `fresh_batches_per_search` batches of the train dataloader reshuffled by (args.seed, t), so a resumed
        run draws the same batches as an uninterrupted one. Batches are loaded only when the step asks."""
        batches = None

        def make_closure():
            nonlocal batches
            if batches is None:
                batches = itertools.cycle(self._probe_batches(self.zo_optimizer.step_count))
            batch = next(batches)
            return lambda: self._zo_loss(model, [batch])

        return make_closure

    def _probe_batches(self, step: int) -> list:
        # The global RNG is forked so drawing probe batches does not move Trainer's own data order.
        with torch.random.fork_rng(devices=[]):
            if self._probe_loader is None:
                torch.manual_seed(self.args.seed)  # accelerate's seedable sampler takes its seed from here
                self._probe_loader = self.get_train_dataloader()
            if hasattr(self._probe_loader, "set_epoch"):
                self._probe_loader.set_epoch(step)
            torch.manual_seed(step_seed(self.args.seed, step))  # for a sampler that draws from the global RNG
            loaded = list(itertools.islice(self._probe_loader, self.zo_optimizer.fresh_batches_per_search))
            # accelerate registers a loader in its gradient state until it is read to the end: unregister this
            # half-read one, or it would stand in for the train dataloader there.
            self._probe_loader.end()
        if not loaded:
            raise ValueError(f"{type(self.zo_optimizer).__name__}'s step found no fresh batch in the train dataloader")
        return [self._prepare_inputs(batch) for batch in loaded]

    # --- evaluation and saving at the trained weights -----------------------------------------------------

    def _unperturbed(self):
        return self.zo_optimizer.unperturbed() if self.zo_optimizer is not None else contextlib.nullcontext()

    def evaluate(self, *args, **kwargs):
        with self._unperturbed():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._unperturbed():
            return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        # Checkpoints go through here before the optimizer state is saved, so both are unperturbed.
        with self._unperturbed():
            return super().save_model(*args, **kwargs)

    def log(self, logs, *args, **kwargs):
        # Trainer measures the norm of gradients that do not exist and would log 0.
        super().log({key: value for key, value in logs.items() if key != "grad_norm"}, *args, **kwargs)

    def train(self, *args, **kwargs):
        self._micro_batches = []  # an interrupted run may have left a partial accumulation
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.zo_optimizer is not None:  # an interrupted two-pass run leaves no +εz in the model
                self.zo_optimizer.restore_weights()


def _resolve_method(method: "str | type") -> type:
    if isinstance(method, type) and issubclass(method, ZOOptimizer):
        return method
    if method in METHODS:
        return METHODS[method]
    raise ValueError(f"unknown zo_method {method!r}: choose from {', '.join(METHODS)} or pass a ZOOptimizer "
                     "subclass")


def _check_args(args: TrainingArguments, trainer: Trainer) -> None:
    """Reject the arguments that only make sense with backpropagation or that would break a ZO step."""
    problems = []
    if args.fp16:
        problems.append("fp16=True: its gradient scaler needs gradients; use bf16=True, or load the model in "
                        "float16 and keep fp16=False")
    default_clip = TrainingArguments.__dataclass_fields__["max_grad_norm"].default
    if args.max_grad_norm and args.max_grad_norm != default_clip:
        problems.append(f"max_grad_norm={args.max_grad_norm}: there are no gradients to clip (leave it at "
                        f"{default_clip} or 0)")
    if args.gradient_checkpointing:
        problems.append("gradient_checkpointing=True: a ZO step stores no activations for a backward pass")
    if args.neftune_noise_alpha:
        problems.append("neftune_noise_alpha: noise would differ between the two probes of a step")
    if args.n_gpu > 1:
        problems.append(f"{args.n_gpu} GPUs in one process (torch.nn.DataParallel): launch one process per GPU "
                        "with torchrun instead, which ZOTrainer trains data-parallel")
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        problems.append("DeepSpeed or FSDP through Trainer: ZOTrainer trains data-parallel under torchrun (DDP); "
                        "to shard parameters, shard the model with torch.distributed.fsdp.fully_shard and drive a "
                        "zokern optimizer yourself (docs/DISTRIBUTED.md)")
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None and any((getattr(parallelism, f"{kind}_size", None) or 1) > 1 for kind in ("tp", "cp", "sp")):
        problems.append("tensor, context or sequence parallel (parallelism_config): not supported; every rank must "
                        "evaluate the whole model on its own share of the batch")
    if problems:
        raise ValueError("ZOTrainer cannot use these TrainingArguments:\n  " + "\n  ".join(problems))
