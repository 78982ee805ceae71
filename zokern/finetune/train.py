"""The fine-tuning loop behind `zokern finetune`: seeded batches, periodic evaluation, metrics, plots,
atomic checkpoints, exact resume, and the seed log that `zokern replay` rebuilds the weights from."""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

import zokern
from zokern.optim import METHODS
from zokern.finetune.data import Example, Task, bbc_news, jsonl_task
from zokern.finetune.model import load_model, resolve_model_path
from zokern.finetune.prompts import PromptClassifier
from zokern.random import SEED_LIMIT
from zokern.seedlog import SeedLogWriter, read as read_seedlog, weights_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FinetuneConfig:
    """`zokern finetune`'s settings. The defaults are the measured CPU default: MeZO on rank-8 LoRA adapters
    (q_proj, v_proj) with lr 1e-3 and eps 1e-2 (MeZO's LoRA setting scaled for a short run), 300 steps of
    batch 16 — see the README's table of runs."""
    method: str = "mezo"
    model: "str | None" = None
    task: str = "bbc-news"
    template: "str | None" = None
    labels: "str | None" = None
    steps: int = 300
    forward_budget: int = 0  # > 0: train for this many forward passes (steps = budget / forwards per step)
    batch_size: int = 16
    lr: float = 1e-3
    eps: float = 1e-2
    weight_decay: float = 0.0
    eval_every: int = 100
    evaluations: int = 0  # > 0: evaluate this many times, evenly over the run (instead of every eval_every)
    eval_examples: int = 100
    seed: int = 0
    dtype: str = "float32"
    backend: "str | None" = None
    output_dir: str = "runs/finetune"
    resume: bool = False
    checkpoint_every: int = 100
    two_pass: bool = False
    lora_rank: int = 8  # > 0: train LoRA adapters of this rank on lora_targets; 0: all weights
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    train_pattern: "str | None" = None  # regex: train only parameters whose names match (e.g. "norm")
    method_options: dict = field(default_factory=dict)
    zero_shot_eval: bool = True  # evaluate the untrained model on the test set first (compare does it once)


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
                      "weight_decay": "--weight-decay"}


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
    for name in ("lr", "eps", "lora_alpha"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{_flag(name)} must be a positive finite number, got {value!r}")
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
    accepted = _constructor_options(METHODS[config.method])
    for name in config.method_options:
        if name in OPTIMIZER_SETTINGS:
            raise ConfigError(f"--option {name}: set it with {OPTIMIZER_SETTINGS[name]}")
        if name not in accepted:
            raise ConfigError(f"--option {name}: {config.method} has no such option; it takes "
                              f"{', '.join(sorted(accepted - set(OPTIMIZER_SETTINGS)))}")


def _check_types(config: FinetuneConfig) -> None:
    """Each setting of its default's type (a float may be given as an int; a None default takes a str)."""
    accepted = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                str: ((str,), "a string"), dict: ((dict,), "a mapping"), type(None): ((str, type(None)), "a string or none")}
    for f in fields(FinetuneConfig):
        value = getattr(config, f.name)
        kinds, wanted = accepted[type(f.default if f.default is not MISSING else f.default_factory())]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"{_flag(f.name)} must be {wanted}, got {value!r}")


def _constructor_options(cls) -> set:
    """The keyword arguments an optimizer class takes, following **options up to the base classes."""
    names: set = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names - {"self", "params", "defaults"}


def check_resumable(recorded: dict, config: FinetuneConfig) -> None:
    """A resumed run must continue the recorded one: any other trajectory setting is a ConfigError."""
    requested = json.loads(json.dumps(asdict(config)))  # as the checkpoint stores it (tuples as lists, ...)
    changed = [f"{name} {recorded.get(name)!r} -> {value!r}" for name, value in requested.items()
               if name not in RESUMABLE_CHANGES and _comparable(name, recorded.get(name)) != _comparable(name, value)]
    if changed:
        raise ConfigError(f"--resume: the run in {config.output_dir} was started with other settings "
                          f"({'; '.join(changed)}); resume with its settings or use a new --output-dir")


def _comparable(name: str, value):
    """Paths as absolute paths: the same model or task file given another way is the same run."""
    if name in ("model", "task") and isinstance(value, str) and value != "bbc-news":
        return os.path.abspath(value)
    return value


def load_task(config: FinetuneConfig) -> Task:
    if config.task == "bbc-news":
        return bbc_news()
    if not (config.template and config.labels):
        from zokern.finetune.data import DataError

        raise DataError("a JSONL --task needs --template (with {text}) and --labels (name=word,...)")
    return jsonl_task(config.task, config.template, config.labels)


def prepare_model(config: FinetuneConfig, model):
    """Mark what trains: every weight, or LoRA adapters (MeZO's LoRA mode) on `lora_targets`."""
    if config.lora_rank <= 0:
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=[t.strip() for t in config.lora_targets.split(",") if t.strip()])
    return get_peft_model(model, lora).eval()


def build_model(config: FinetuneConfig):
    """(model, tokenizer, trained (name, tensor) pairs), always in this order from a seeded torch RNG: LoRA
    adapters are initialised from it, and `zokern replay` must start from the same ones."""
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, DTYPES[config.dtype])
    model = prepare_model(config, model)
    return model, tokenizer, trainable_parameters(config, model)


def seedlog_header(config: FinetuneConfig, model, trainable: list, device: torch.device) -> dict:
    """What replay needs to rebuild the run's starting point and optimizer, and to refuse a different one:
    the hash covers every parameter, so a LoRA run also pins its frozen base."""
    return {"method": config.method, "config": asdict(config), "model": str(resolve_model_path(config.model)),
            "backend": zokern.backends.resolve(config.backend, device.type), "versions": _versions(),
            "trainable": [name for name, _ in trainable], "base_sha256": weights_sha256(model.named_parameters())}


def trainable_parameters(config: FinetuneConfig, model) -> list:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.train_pattern:
        trainable = [(n, p) for n, p in trainable if re.search(config.train_pattern, n)]
        if not trainable:
            raise ValueError(f"--train-pattern {config.train_pattern!r} matches no trainable parameter")
    if config.method == "dizo" and getattr(model.config, "tie_word_embeddings", False):
        # DiZO's authors leave the tied token embedding out of training [ALGORITHMS.md §4].
        tied = model.get_input_embeddings().weight
        trainable = [(n, p) for n, p in trainable if p is not tied]
    return trainable


def make_optimizer(config: FinetuneConfig, trainable: list):
    """The optimizer of a checked config (check_config); an option value it refuses is a ConfigError."""
    options = dict(config.method_options)
    if config.weight_decay and config.method != "subzero":
        options["weight_decay"] = config.weight_decay
    if config.two_pass:
        options["two_pass"] = True
    try:
        return METHODS[config.method](trainable, lr=config.lr, eps=config.eps, seed=config.seed,
                                      backend=config.backend, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.method} with --option {config.method_options}: {exc}") from None


def planned_steps(config: FinetuneConfig, optimizer) -> int:
    """config.steps, or with a forward budget the steps that spend it at the method's forwards per step."""
    if config.forward_budget <= 0:
        return config.steps
    return max(1, round(config.forward_budget / optimizer.mean_forwards_per_step))


def sample(examples: list[Example], size: int, *key) -> list[Example]:
    """A batch that depends only on (seed, step, ...): a resumed run sees the same batches."""
    return random.Random(repr(key)).sample(examples, min(size, len(examples)))


class CheckpointError(ValueError):
    """An --output-dir that cannot be written, or resumed from as asked; reported before the model loads."""


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
KEPT_CHECKPOINTS = 2
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt")


class Run:
    """Files of one run in --output-dir: metrics.jsonl, seedlog.jsonl, summary.json, plots, and the checkpoints
    checkpoint-<step>/ with the link `checkpoint` to the newest.

    A checkpoint is written whole into checkpoint-<step>.tmp/, synced, and renamed into place; the link is
    replaced atomically; an old one is renamed to .del before it is removed. A run killed at any point
    leaves complete checkpoints under their own names, and leftovers that the next save or resume removes."""

    def __init__(self, directory: str):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CheckpointError(f"--output-dir {directory}: it or a folder above it is a file") from None
        except OSError as exc:
            raise CheckpointError(f"--output-dir {directory}: {exc.strerror}") from None
        self.metrics_path = self.dir / "metrics.jsonl"
        self.seedlog_path = self.dir / "seedlog.jsonl"
        self.checkpoint = self.dir / "checkpoint"

    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """The metrics so far; a last line cut short by a killed run is dropped."""
        if not self.metrics_path.exists():
            return []
        lines = [line for line in self.metrics_path.read_text(errors="replace").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise CheckpointError(f"{self.metrics_path}:{number} is not a JSON record") from None
        return records

    def truncate_metrics(self, last_step: int) -> None:
        kept = [r for r in self.records() if r.get("step", 0) <= last_step]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def checkpoints(self) -> list[Path]:
        """The complete checkpoint directories, newest first."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir()
                 if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
        return [p for _, p in sorted(found, reverse=True)]

    def remove_leftovers(self) -> None:
        """What a killed save leaves: a half-written .tmp, a half-removed .del, a temporary link."""
        for p in self.dir.glob("checkpoint*"):
            if p.suffix in (".tmp", ".del"):
                _remove(p)

    def start_over(self) -> None:
        """A new run in this directory: another run's checkpoints and metrics go, so that a later --resume
        cannot pick them up."""
        self.remove_leftovers()
        for path in self.checkpoints():
            _discard(path)
        _remove(self.checkpoint)
        _remove(self.metrics_path)

    def save_checkpoint(self, trainable: list, optimizer, progress: dict, config: "FinetuneConfig") -> None:
        """The trained tensors (all weights, or the LoRA adapters), optimizer state, progress and configuration,
        with the sha256 of each file, as checkpoint-<step>/; keeps the newest KEPT_CHECKPOINTS."""
        from safetensors.torch import save_file

        self.remove_leftovers()
        name = f"checkpoint-{progress['step']}"
        tmp, final = self.dir / f"{name}.tmp", self.dir / name
        tmp.mkdir()
        save_file({n: p.detach().contiguous() for n, p in trainable}, str(tmp / CHECKPOINT_FILES[0]))
        torch.save(optimizer.state_dict(), tmp / CHECKPOINT_FILES[1])
        digests = {f: _sha256(tmp / f) for f in CHECKPOINT_FILES}
        (tmp / "progress.json").write_text(json.dumps({"state": progress, "config": asdict(config),
                                                       "sha256": digests}))
        for path in (*tmp.iterdir(), tmp):
            _fsync(path)
        if final.exists():  # the final save after restore_weights() rewrites the last step's checkpoint
            _discard(final)
        os.replace(tmp, final)
        _fsync(self.dir)
        link = self.dir / "checkpoint.tmp"
        os.symlink(name, link)
        os.replace(link, self.checkpoint)
        _fsync(self.dir)
        for old in self.checkpoints()[KEPT_CHECKPOINTS:]:
            _discard(old)

    def resume_point(self, stream) -> "tuple[Path, dict] | None":
        """(newest checkpoint that reads back whole, its progress.json: state, config, sha256), skipping
        damaged ones and ones past the end of the seed log with a line on `stream`. None when the directory
        holds no run at all; a run without a complete checkpoint is a CheckpointError."""
        self.remove_leftovers()
        logged = len(read_seedlog(self.seedlog_path)[1]) if self.seedlog_path.exists() else None
        found = self.checkpoints()
        for path in found:
            try:
                progress = _verified_progress(path)
            except CheckpointError as exc:
                print(f"skipping {path.name}: {exc}", file=stream)
                continue
            if logged is not None and progress["state"]["step"] > logged:
                print(f"skipping {path.name}: the seed log ends at step {logged}", file=stream)
                continue
            self.records()  # metrics damaged before their last line fail here, not after the model loads
            return path, progress
        if found or self.seedlog_path.exists() or self.metrics_path.exists():
            raise CheckpointError(f"--resume: {self.dir} holds a run but no complete checkpoint; "
                                  "run without --resume to start it over")
        return None

    def load_checkpoint(self, path: Path, trainable: list, optimizer) -> None:
        from safetensors.torch import load_file

        try:
            saved = load_file(str(path / CHECKPOINT_FILES[0]))
            # Tensors and plain data only: unpickling anything else could run code from the file.
            state = torch.load(path / CHECKPOINT_FILES[1], weights_only=True)
        except Exception as exc:  # safetensors' and the unpickler's errors share no narrower base
            first_line = (str(exc).splitlines() or [""])[0]
            raise CheckpointError(f"{path.name}: cannot load {' or '.join(CHECKPOINT_FILES)} "
                                  f"({type(exc).__name__}: {first_line})") from None
        missing = [name for name, _ in trainable if name not in saved]
        if missing:
            raise CheckpointError(f"{path.name} lacks the trained tensor {missing[0]} ({len(missing)} missing)")
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(saved[name])
        try:
            optimizer.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: its optimizer state does not fit this optimizer ({exc})") from None


def _verified_progress(path: Path) -> dict:
    """The progress.json of a checkpoint whose files all match their recorded sha256."""
    try:
        progress = json.loads((path / "progress.json").read_text())
        if not isinstance(progress["state"]["step"], int) or not isinstance(progress["config"], dict):
            raise ValueError("progress.json lacks the step or the configuration")
        damaged = [name for name in CHECKPOINT_FILES if _sha256(path / name) != progress["sha256"][name]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if damaged:
        raise CheckpointError(f"{damaged[0]} does not match its recorded sha256 (damaged or cut short)")
    return progress


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _discard(path: Path) -> None:
    """Remove a checkpoint directory so that a kill midway never leaves a partial one under its own name."""
    doomed = path.with_name(path.name + ".del")
    _remove(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finetune(config: FinetuneConfig, progress_stream=None) -> dict:
    """Train and evaluate as `config` says, reporting progress on `progress_stream` (default: sys.stderr at
    the time of the call). The settings, the data, the model path and, with `resume`, the checkpoint to
    continue from are checked before the model loads (ConfigError, DataError, ModelError, CheckpointError,
    SeedLogError)."""
    start_time = time.perf_counter()
    progress_stream = progress_stream or sys.stderr
    check_config(config)
    task = load_task(config)
    resolve_model_path(config.model)
    run = Run(config.output_dir)
    resume_from = run.resume_point(progress_stream) if config.resume else None
    if resume_from is not None:
        check_resumable(resume_from[1]["config"], config)
    elif config.resume:
        print(f"--resume: nothing in {run.dir} yet; starting a new run", file=progress_stream)
    model, tokenizer, trainable = build_model(config)
    classifier = PromptClassifier(task, tokenizer)
    optimizer = make_optimizer(config, trainable)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, also when runs share a process
    eval_set = task.validation[:config.eval_examples]

    steps = planned_steps(config, optimizer)
    eval_every = max(1, steps // config.evaluations) if config.evaluations > 0 else config.eval_every
    state = {"step": 0, "forwards": 0, "best_validation_accuracy": None, "zero_shot_accuracy": None}
    if resume_from is not None:
        path, progress = resume_from
        run.load_checkpoint(path, trainable, optimizer)
        state = {"forwards": 0, **progress["state"]}
        print(f"resuming from {path.name} (step {state['step']})", file=progress_stream)
        run.truncate_metrics(state["step"])
        if run.seedlog_path.exists():
            seedlog = SeedLogWriter.resume(run.seedlog_path, state["step"])
        else:
            seedlog = None
            print(f"{run.seedlog_path} is missing: this run will have no seed log", file=progress_stream)
    else:
        run.start_over()
        seedlog = SeedLogWriter(run.seedlog_path, seedlog_header(config, model, trainable, device))
        if config.zero_shot_eval:
            state["zero_shot_accuracy"] = classifier.accuracy(model, task.test)
            run.log({"step": 0, "zero_shot_test_accuracy": state["zero_shot_accuracy"]})
    if seedlog is not None:
        optimizer.record_hook = seedlog.write

    def closure_for(batch):
        def closure():
            state["forwards"] += 1
            return classifier.loss(model, batch)
        return closure

    train_start, first_step = time.perf_counter(), state["step"]
    for step in range(first_step, steps):
        batch = classifier.batch(sample(task.train, config.batch_size, config.seed, step), device)
        extra = {}
        if config.method == "dizo":
            counter = iter(range(1_000_000))
            extra["fresh_closure"] = lambda: closure_for(classifier.batch(
                sample(task.train, config.batch_size, config.seed, step, "probe", next(counter)), device))
        loss = float(optimizer.step(closure_for(batch), **extra))
        record = {"step": step + 1, "forwards": state["forwards"], "loss": loss, "lr": optimizer.param_groups[0]["lr"]}
        done = step + 1 - first_step
        rate = done / (time.perf_counter() - train_start)
        _progress(progress_stream, step + 1, steps, loss, rate)
        if eval_every and (step + 1) % eval_every == 0 or step + 1 == steps:
            with optimizer.unperturbed():
                record["validation_accuracy"] = classifier.accuracy(model, eval_set)
            best = state["best_validation_accuracy"]
            state["best_validation_accuracy"] = max(best or 0.0, record["validation_accuracy"])
            print(f"\nstep {step + 1}: validation accuracy {record['validation_accuracy']:.3f}", file=progress_stream)
        run.log(record)
        state["step"] = step + 1
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            run.save_checkpoint(trainable, optimizer, state, config)

    optimizer.restore_weights()
    if seedlog is not None:
        seedlog.close()
    steps_per_second = (state["step"] - first_step) / max(1e-9, time.perf_counter() - train_start)
    final = classifier.accuracy(model, task.test)
    run.save_checkpoint(trainable, optimizer, state, config)
    summary = {
        "task": task.name, "method": config.method, "zero_shot_accuracy": state["zero_shot_accuracy"],
        "final_accuracy": final, "best_validation_accuracy": state["best_validation_accuracy"],
        "steps": state["step"], "forwards": state["forwards"], "steps_per_second": steps_per_second,
        "wall_seconds": time.perf_counter() - start_time,
        "peak_memory_bytes": _peak_memory(device), "nonfinite_steps": optimizer.nonfinite_steps,
        "hyperparameters": asdict(config),
        "versions": _versions(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "backend": zokern.backends.resolve(config.backend, device.type),
    }
    _atomic_write(run.dir / "summary.json", json.dumps(summary, indent=2).encode())
    _plot(run)
    return summary


def _versions() -> dict:
    return {"zokern": zokern.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _progress(stream, step: int, total: int, loss: float, rate: float) -> None:
    left = (total - step) / rate if rate > 0 else float("nan")
    width = 30
    filled = int(width * step / total)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}  loss {loss:.4f}  "
                 f"{rate:.2f} steps/s  {left / 60:.1f} min left ")
    stream.flush()


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _plot(run: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.records()
    for key, name, ylabel in (("loss", "loss.png", "training loss"),
                              ("validation_accuracy", "validation_accuracy.png", "validation accuracy")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run.dir / name, dpi=100)
        plt.close(fig)
