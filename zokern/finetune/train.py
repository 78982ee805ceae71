"""The fine-tuning loop behind `zokern finetune`: seeded batches, periodic evaluation, metrics, plots,
atomic checkpoints, exact resume, and the seed log that `zokern replay` rebuilds the weights from."""
from __future__ import annotations

import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import zokern
from zokern.optim import METHODS
from zokern.finetune.data import Example, Task, bbc_news, jsonl_task
from zokern.finetune.model import load_model, resolve_model_path
from zokern.finetune.prompts import PromptClassifier
from zokern.seedlog import SeedLogWriter, weights_sha256

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
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    options = dict(config.method_options)
    if config.weight_decay and config.method != "subzero":
        options["weight_decay"] = config.weight_decay
    if config.two_pass:
        options["two_pass"] = True
    return METHODS[config.method](trainable, lr=config.lr, eps=config.eps, seed=config.seed,
                                  backend=config.backend, **options)


def planned_steps(config: FinetuneConfig, optimizer) -> int:
    """config.steps, or with a forward budget the steps that spend it at the method's forwards per step."""
    if config.forward_budget <= 0:
        return config.steps
    return max(1, round(config.forward_budget / optimizer.mean_forwards_per_step))


def sample(examples: list[Example], size: int, *key) -> list[Example]:
    """A batch that depends only on (seed, step, ...): a resumed run sees the same batches."""
    return random.Random(repr(key)).sample(examples, min(size, len(examples)))


class Run:
    """Files of one run in --output-dir: metrics.jsonl, summary.json, plots, checkpoint/."""

    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.seedlog_path = self.dir / "seedlog.jsonl"
        self.checkpoint = self.dir / "checkpoint"

    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_step: int) -> None:
        kept = [r for r in self.records() if r.get("step", 0) <= last_step]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_checkpoint(self, trainable: list, optimizer, progress: dict) -> None:
        """The trained tensors (all weights, or the LoRA adapters), optimizer state and progress, written to a
        temporary directory and renamed into place."""
        from safetensors.torch import save_file

        tmp = self.dir / "checkpoint.tmp"
        tmp.mkdir(exist_ok=True)
        save_file({name: p.detach().contiguous() for name, p in trainable}, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps(progress))
        old = self.dir / "checkpoint.old"
        if self.checkpoint.exists():
            self.checkpoint.rename(old)
        tmp.rename(self.checkpoint)  # a killed run leaves either the old or the new checkpoint, whole
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def load_checkpoint(self, trainable: list, optimizer) -> dict:
        from safetensors.torch import load_file

        saved = load_file(str(self.checkpoint / "model.safetensors"))
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(saved[name])
        optimizer.load_state_dict(torch.load(self.checkpoint / "optimizer.pt", weights_only=False))
        return json.loads((self.checkpoint / "progress.json").read_text())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def finetune(config: FinetuneConfig, progress_stream=sys.stderr) -> dict:
    start_time = time.perf_counter()
    task = load_task(config)
    model, tokenizer, trainable = build_model(config)
    classifier = PromptClassifier(task, tokenizer)
    optimizer = make_optimizer(config, trainable)
    run = Run(config.output_dir)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, also when runs share a process
    eval_set = task.validation[:config.eval_examples]

    steps = planned_steps(config, optimizer)
    eval_every = max(1, steps // config.evaluations) if config.evaluations > 0 else config.eval_every
    state = {"step": 0, "forwards": 0, "best_validation_accuracy": None, "zero_shot_accuracy": None}
    if config.resume and run.checkpoint.exists():
        state = {"forwards": 0, **run.load_checkpoint(trainable, optimizer)}
        run.truncate_metrics(state["step"])
        if run.seedlog_path.exists():
            seedlog = SeedLogWriter.resume(run.seedlog_path, state["step"])
        else:
            seedlog = None
            print(f"{run.seedlog_path} is missing: this run will have no seed log", file=progress_stream)
    else:
        seedlog = SeedLogWriter(run.seedlog_path, seedlog_header(config, model, trainable, device))
        if run.metrics_path.exists():
            run.metrics_path.unlink()
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
            run.save_checkpoint(trainable, optimizer, state)

    optimizer.restore_weights()
    if seedlog is not None:
        seedlog.close()
    steps_per_second = (state["step"] - first_step) / max(1e-9, time.perf_counter() - train_start)
    final = classifier.accuracy(model, task.test)
    run.save_checkpoint(trainable, optimizer, state)
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
