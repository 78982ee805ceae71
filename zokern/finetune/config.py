"""`zokern finetune`'s configuration: the run's settings, their checks before anything loads, and the
comparison of a resumed run's settings with the recorded ones."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

import zokern
from zokern.optim import METHODS
from zokern.random import SEED_LIMIT, parse_distribution

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_MODES = ("auto", "module", "in-place")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class FinetuneConfig:
    """`zokern finetune`'s settings. The defaults are the measured CPU default: MeZO on rank-8 LoRA adapters
    (q_proj, v_proj) in bfloat16 through probe mode, lr 1e-3 decaying linearly and eps 1e-2 (MeZO's LoRA setting
    scaled for a short run), 800 steps of batch 8 — see the README's table of runs."""
    method: str = "mezo"
    model: "str | None" = None
    task: str = "bbc-news"
    template: "str | None" = None
    labels: "str | None" = None
    steps: int = 800
    forward_budget: int = 0  # > 0: train for this many forward passes (steps = budget / forwards per step)
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "linear"  # "linear" / "cosine": from lr at the first step towards 0 after the last
    eps: float = 1e-2
    weight_decay: float = 0.0
    eval_every: int = 100
    evaluations: int = 0  # > 0: evaluate this many times, evenly over the run (instead of every eval_every)
    eval_examples: int = 100
    seed: int = 0
    dtype: str = "bfloat16"
    backend: "str | None" = None
    output_dir: str = "runs/finetune"
    resume: bool = False
    checkpoint_every: int = 100
    two_pass: bool = False
    rounding: "str | None" = None  # how updates are stored in 16-bit weights; None: the optimizers' default
    lora_rank: int = 8  # > 0: train LoRA adapters of this rank on lora_targets; 0: all weights
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    train_pattern: "str | None" = None  # regex: train only parameters whose names match (e.g. "norm")
    method_options: dict = field(default_factory=dict)
    zero_shot_eval: bool = True  # evaluate the untrained model on the test set first (compare does it once)
    # "module": probe mode (the forwards see θ ± εP through transient copies; only the update writes the weights);
    # "in-place": the weights are perturbed and restored; "auto": probe mode for 16-bit weights without --two-pass.
    probe_mode: str = "auto"
    # Under torchrun: shard the model with FSDP2 (each decoder layer and the root) instead of copying it to every
    # process (docs/DISTRIBUTED.md).
    fsdp: bool = False


class ConfigError(ValueError):
    """A setting that cannot work, reported before anything loads."""


# What a resumed run may change: how long it runs, what it evaluates, where it writes. Everything else sets the
# trajectory of the steps, and must be as the run was started.
RESUMABLE_CHANGES = ("steps", "forward_budget", "eval_every", "evaluations", "eval_examples", "output_dir", "resume",
                     "checkpoint_every", "zero_shot_eval")
# Least values of the integer settings.
INTEGER_MINIMUMS = {"steps": 1, "batch_size": 1, "eval_examples": 1, "forward_budget": 0, "eval_every": 0,
                    "evaluations": 0, "checkpoint_every": 0, "lora_rank": 0, "seed": 0}
# Optimizer arguments that make_optimizer sets from the config's own settings.
OPTIMIZER_SETTINGS = {"lr": "--lr", "eps": "--eps", "seed": "--seed", "backend": "--backend", "two_pass": "--two-pass",
                      "weight_decay": "--weight-decay", "rounding": "--rounding"}
ROUNDINGS = ("nearest", "stochastic")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(config: FinetuneConfig) -> None:
    """Every setting that can be checked without data or model, so that a bad one fails in a second."""
    _check_types(config)
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype {config.dtype!r}: choose from {', '.join(DTYPES)}")
    if config.backend is not None and config.backend not in zokern.backends.BACKENDS:
        raise ConfigError(f"--backend {config.backend!r}: choose from {', '.join(zokern.backends.BACKENDS)}")
    if config.rounding is not None and config.rounding not in ROUNDINGS:
        raise ConfigError(f"--rounding {config.rounding!r}: choose from {', '.join(ROUNDINGS)}")
    for name in ("eps", "lora_alpha"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{_flag(name)} must be a positive finite number, got {value!r}")
    if not (math.isfinite(config.lr) and config.lr >= 0):  # 0: a dry run, which must leave the weights as they are
        raise ConfigError(f"--lr must be a finite number >= 0, got {config.lr!r}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--lr-schedule {config.lr_schedule!r}: choose from {', '.join(LR_SCHEDULES)}")
    if config.probe_mode not in PROBE_MODES:
        raise ConfigError(f"--probe-mode {config.probe_mode!r}: choose from {', '.join(PROBE_MODES)}")
    if config.probe_mode == "module" and config.two_pass:
        raise ConfigError("--probe-mode module never leaves the weights perturbed: it has no --two-pass")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {config.weight_decay!r}")
    for name, least in INTEGER_MINIMUMS.items():
        value = getattr(config, name)
        if value < least:
            raise ConfigError(f"{_flag(name)} must be an integer >= {least}, got {value!r}")
    if config.seed >= SEED_LIMIT:
        raise ConfigError(f"--seed must be below 2**63, got {config.seed}")
    if config.lora_rank > 0 and not [t for t in config.lora_targets.split(",") if t.strip()]:
        raise ConfigError("--lora-targets names no module for the LoRA adapters")
    if config.train_pattern is not None:
        try:
            re.compile(config.train_pattern)
        except re.error as exc:
            raise ConfigError(f"--train-pattern {config.train_pattern!r} is not a regular expression: {exc}") from None
    method = METHODS[config.method]
    if config.two_pass and not method.two_pass_supported:
        raise ConfigError(f"--two-pass: {config.method} has no two-pass mode")
    if config.weight_decay and not method.weight_decay_supported:
        raise ConfigError(f"--weight-decay: {config.method} has no weight decay; leave it at 0")
    accepted = method.option_names()
    for name in config.method_options:
        if name in OPTIMIZER_SETTINGS:
            raise ConfigError(f"--option {name}: set it with {OPTIMIZER_SETTINGS[name]}")
        if name not in accepted:
            raise ConfigError(f"--option {name}: {config.method} has no such option; it takes "
                              f"{', '.join(sorted(accepted - set(OPTIMIZER_SETTINGS)))}")
    if "dist" in config.method_options:
        try:
            parse_distribution(config.method_options["dist"])
        except ValueError as exc:
            raise ConfigError(f"--option dist: {exc}") from None
    if config.method_options.get("side_path") and not uses_probes(asdict(config)):
        raise ConfigError("--option side_path: SubZero's side path trains in probe mode only; add --probe-mode "
                          "module (a float32 run's --probe-mode auto is in-place)")


def _check_types(config: FinetuneConfig) -> None:
    """Each setting of its default's type (a float may be given as an int; a None default takes a str)."""
    accepted = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                str: ((str,), "a string"), dict: ((dict,), "a mapping"), type(None): ((str, type(None)), "a string or none")}
    for f in fields(FinetuneConfig):
        value = getattr(config, f.name)
        kinds, wanted = accepted[type(f.default if f.default is not MISSING else f.default_factory())]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"{_flag(f.name)} must be {wanted}, got {value!r}")


def scheduled_lr(config: FinetuneConfig, step: int, steps: int) -> float:
    """The learning rate of 0-based step `step` of `steps`: a pure function of the step, so a resumed run and
    the seed log (which records each step's rate) agree."""
    progress = step / steps
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - progress)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


def uses_probes(settings: dict) -> bool:
    """Whether a run with these settings (a config as a dict) trains in probe mode. A run recorded before
    probe_mode existed perturbed in place."""
    mode = settings.get("probe_mode", "in-place")
    if mode == "auto":
        return settings["dtype"] != "float32" and not settings["two_pass"]
    return mode == "module"


def unused_settings(settings: dict) -> "set[str]":
    """The settings that another one overrides in a run with these settings (a config as a dict): --steps
    under a forward budget, --eval-every under a number of evaluations."""
    return ({"steps"} if settings.get("forward_budget", 0) > 0 else set()) | \
        ({"eval_every"} if settings.get("evaluations", 0) > 0 else set())


def check_resumable(recorded: dict, config: FinetuneConfig) -> None:
    """A resumed run must continue the recorded one: any other trajectory setting is a ConfigError. The probe
    mode is compared as it resolves ("auto" for a float32 run is "in-place")."""
    requested = json.loads(json.dumps(asdict(config)))  # as the checkpoint stores it (tuples as lists, ...)
    # A run recorded before lr_schedule existed trained at a constant rate.
    recorded = {"lr_schedule": "constant", **recorded, "probe_mode": "module" if uses_probes(recorded) else "in-place"}
    requested["probe_mode"] = "module" if uses_probes(requested) else "in-place"
    changed = [f"{name} {recorded.get(name)!r} -> {value!r}" for name, value in requested.items()
               if name not in RESUMABLE_CHANGES and _comparable(name, recorded.get(name)) != _comparable(name, value)]
    if recorded.get("lr_schedule", "constant") != "constant":  # the rates depend on the run's length
        unused = unused_settings(recorded) & unused_settings(requested)
        changed += [f"{name} {recorded.get(name)!r} -> {requested[name]!r} (with --lr-schedule "
                    f"{recorded['lr_schedule']})" for name in ("steps", "forward_budget")
                    if name not in unused and recorded.get(name) != requested[name]]
    if changed:
        raise ConfigError(f"--resume: the run in {config.output_dir} was started with other settings "
                          f"({'; '.join(changed)}); resume with its settings or use a new --output-dir")


def _comparable(name: str, value):
    """Paths as absolute paths: the same model or task file given another way is the same run."""
    if name in ("model", "task") and isinstance(value, str) and value != "bbc-news":
        return os.path.abspath(value)
    return value
