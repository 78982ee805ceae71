"""The fine-tuning loop behind `zokern finetune`: seeded batches, periodic evaluation, metrics, plots,
checkpoints, exact resume, and the seed log that `zokern replay` rebuilds the weights from. The settings
are in zokern.finetune.config, the run's files in zokern.finetune.run_files."""
from __future__ import annotations

import io
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import zokern
from zokern import distributed
from zokern.finetune.config import (DTYPES, ConfigError, FinetuneConfig, check_config, check_resumable, scheduled_lr,
                                    uses_probes)
from zokern.finetune.data import Example, Task, bbc_news, jsonl_task
from zokern.finetune.model import load_model, resolve_model_path
from zokern.finetune.prompts import PromptClassifier
from zokern.finetune.run_files import CheckpointError, Run
from zokern.fileio import atomic_write
from zokern.optim import METHODS
from zokern.seedlog import SeedLogWriter, weights_sha256


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


def shard(model) -> None:
    """--fsdp: FSDP2's fully_shard on each decoder layer (the items of every module list named `layers`) and on the
    root (the base model under LoRA adapters, which hold no parameters of their own), which must reshard after its
    forward so that every forward gathers the optimizer's writes (docs/DISTRIBUTED.md)."""
    from torch.distributed.fsdp import fully_shard

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [layer for name, module in root.named_modules()
              if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" for layer in module]
    if not layers:
        raise ConfigError(f"--fsdp: {type(root).__name__} has no decoder layers (a module list named 'layers') to "
                          "shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
    root.set_reshard_after_forward(True)


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
            raise ConfigError(f"--train-pattern {config.train_pattern!r} matches no trainable parameter")
    if not METHODS[config.method].trains_tied_embeddings and getattr(model.config, "tie_word_embeddings", False):
        # The method leaves a token embedding tied to the output layer out of training (DiZO's authors).
        tied = model.get_input_embeddings().weight
        trainable = [(n, p) for n, p in trainable if p is not tied]
    return trainable


def make_optimizer(config: FinetuneConfig, trainable: list):
    """The optimizer of a checked config (check_config); an option value it refuses is a ConfigError."""
    method = METHODS[config.method]
    options = dict(config.method_options)
    if config.weight_decay and method.weight_decay_supported:
        options["weight_decay"] = config.weight_decay
    if config.two_pass:
        options["two_pass"] = True
    try:
        return method(trainable, lr=config.lr, eps=config.eps, seed=config.seed, backend=config.backend,
                      rounding=config.rounding, **options)
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


def finetune(config: FinetuneConfig, progress_stream=None) -> dict:
    """Train and evaluate as `config` says, reporting progress on `progress_stream` (default: sys.stderr at
    the time of the call). The settings, the data, the model path and, with `resume`, the checkpoint to
    continue from are checked before the model loads (ConfigError, DataError, ModelError, CheckpointError,
    SeedLogError).

    Under torchrun every process trains the same model on its share of each --batch-size batch and the
    optimizer averages the losses over the processes (docs/DISTRIBUTED.md); rank 0 alone evaluates, reports
    progress and writes the run's files."""
    start_time = time.perf_counter()
    started_group = distributed.init_from_environment()
    try:
        return _finetune(config, progress_stream or sys.stderr, start_time)
    finally:
        if started_group:
            distributed.shutdown()


def _finetune(config: FinetuneConfig, progress_stream, start_time: float) -> dict:
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    if not main:
        progress_stream = io.StringIO()  # rank 0 reports for all
    check_config(config)
    if config.fsdp and world < 2:
        raise ConfigError(f"--fsdp shards the model over torchrun's processes; this run has {world}: start it with "
                          "torchrun --nproc-per-node 2 (or more) -m zokern finetune --fsdp ...")
    if config.batch_size < world:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch, split over {world} processes: "
                          f"give each at least one example (--batch-size >= {world})")
    task = load_task(config)
    resolve_model_path(config.model)
    run = Run(config.output_dir)
    resume_from = run.resume_point(progress_stream) if config.resume and main else None
    resume_from = distributed.broadcast_object(resume_from)
    if resume_from is not None:
        check_resumable(resume_from[1]["config"], config)
        saved_world = resume_from[1]["state"].get("world_size", 1)
        if saved_world != world:
            raise CheckpointError(f"--resume: the run in {run.dir} was trained on {saved_world} processes; resume "
                                  f"it on {saved_world} (this is {world})")
    elif config.resume:
        print(f"--resume: nothing in {run.dir} yet; starting a new run", file=progress_stream)
    model, tokenizer, trainable = build_model(config)
    device = next(model.parameters()).device
    # Taken from the whole model, which replay starts from.
    header = seedlog_header(config, model, trainable, device) if main and resume_from is None else None
    if config.fsdp:
        shard(model)
        trainable = trainable_parameters(config, model)  # the sharded parameters, under the same names
    # Under --fsdp every forward gathers on every rank: all ranks evaluate, rank 0 reports.
    evaluates = main or config.fsdp
    classifier = PromptClassifier(task, tokenizer)
    optimizer = make_optimizer(config, trainable)
    if uses_probes(asdict(config)):
        optimizer.attach(model)  # replay reads probe mode from each step's record
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, also when runs share a process
    eval_set = task.validation[:config.eval_examples]

    steps = planned_steps(config, optimizer)
    eval_every = max(1, steps // config.evaluations) if config.evaluations > 0 else config.eval_every
    state = {"step": 0, "forwards": 0, "best_validation_accuracy": None, "zero_shot_accuracy": None,
             "world_size": world}
    if resume_from is not None:
        path, progress = resume_from
        if config.fsdp:
            run.load_sharded_checkpoint(path, model, optimizer)
        else:
            run.load_checkpoint(path, trainable, optimizer)
        state = {"forwards": 0, **progress["state"]}
        print(f"resuming from {path.name} (step {state['step']})", file=progress_stream)
        seedlog = None
        if main:
            run.truncate_metrics(state["step"])
            if run.seedlog_path.exists():
                seedlog = SeedLogWriter.resume(run.seedlog_path, state["step"])
            else:
                print(f"{run.seedlog_path} is missing: this run will have no seed log", file=progress_stream)
    elif not main:
        seedlog = None
    else:
        run.start_over()
        seedlog = SeedLogWriter(run.seedlog_path, header)
    if resume_from is None and config.zero_shot_eval and evaluates:
        state["zero_shot_accuracy"] = classifier.accuracy(model, task.test)
        if main:
            run.log({"step": 0, "zero_shot_test_accuracy": state["zero_shot_accuracy"]})
    if seedlog is not None:
        optimizer.record_hook = seedlog.write

    def closure_for(examples):
        """The loss on this process's share of a global batch, with the share's size (uneven shares)."""
        mine = distributed.share(examples, world, rank)
        batch = classifier.batch(mine, device)

        def closure():
            state["forwards"] += 1
            loss = classifier.loss(model, batch)
            return loss if world == 1 else (loss, len(mine))
        return closure

    def fresh_closure_for(step):
        """New batches for a step that evaluates more than its own (`uses_fresh_batches`), keyed by (seed,
        step, draw) so a resumed run sees the same ones."""
        draws = iter(range(1_000_000))
        return lambda: closure_for(sample(task.train, config.batch_size, config.seed, step, "probe", next(draws)))

    def save_checkpoint():
        """Rank 0 saves the whole trained tensors; under --fsdp every rank saves its shards."""
        if config.fsdp:
            run.save_sharded_checkpoint(model, trainable, optimizer, state, config)
        elif main:
            run.save_checkpoint(trainable, optimizer, state, config)

    train_start, first_step = time.perf_counter(), state["step"]
    # disable=None: a bar on a terminal only; the evaluation lines are written either way.
    with tqdm(total=steps, initial=first_step, unit="step", file=progress_stream, disable=None,
              dynamic_ncols=True) as bar:
        for step in range(first_step, steps):
            examples = sample(task.train, config.batch_size, config.seed, step)
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(config, step, steps)
            loss = float(optimizer.step(closure_for(examples), fresh_closure_for(step)))
            record = {"step": step + 1, "forwards": state["forwards"], "loss": loss,
                      "lr": optimizer.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()
            if eval_every and (step + 1) % eval_every == 0 or step + 1 == steps:
                optimizer.restore_weights()  # on every rank: the ranks' weights stay the same
                accuracy = classifier.accuracy(model, eval_set) if evaluates else None
                if main:
                    record["validation_accuracy"] = accuracy
                    best = state["best_validation_accuracy"]
                    state["best_validation_accuracy"] = max(best or 0.0, record["validation_accuracy"])
                    bar.write(f"step {step + 1}: validation accuracy {record['validation_accuracy']:.3f}",
                              file=progress_stream)
            state["step"] = step + 1
            if main:
                run.log(record)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                save_checkpoint()

    optimizer.restore_weights()
    if seedlog is not None:
        seedlog.close()
    steps_per_second = (state["step"] - first_step) / max(1e-9, time.perf_counter() - train_start)
    final = classifier.accuracy(model, task.test) if evaluates else None
    save_checkpoint()
    summary = {
        "task": task.name, "method": config.method, "zero_shot_accuracy": state["zero_shot_accuracy"],
        "final_accuracy": final if main else None, "best_validation_accuracy": state["best_validation_accuracy"],
        "steps": state["step"], "forwards": state["forwards"], "steps_per_second": steps_per_second,
        "wall_seconds": time.perf_counter() - start_time,
        "peak_memory_bytes": _peak_memory(device), "nonfinite_steps": optimizer.nonfinite_steps,
        "hyperparameters": asdict(config),
        "versions": _versions(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "backend": zokern.backends.resolve(config.backend, device.type), "world_size": world,
    }
    if main:
        atomic_write(run.dir / "summary.json", json.dumps(summary, indent=2).encode())
        _plot(run)
    distributed.barrier()  # the run's files are complete when any process returns
    return summary


def _versions() -> dict:
    return {"zokern": zokern.__version__, "torch": torch.__version__, "python": platform.python_version()}


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
