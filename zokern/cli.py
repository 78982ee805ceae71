"""The zokern command line: `zokern finetune`, `zokern compare`, `zokern replay`, `zokern info`, `zokern demo`."""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

import zokern
from zokern import backends, library


def info_command(args) -> int:
    print(f"zokern {zokern.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = ["cpu"] + ([f"cuda ({torch.cuda.get_device_name()})"] if torch.cuda.is_available() else [])
    print("devices: " + ", ".join(devices))
    print(f"ops: {', '.join('zokern::' + name for name in library.SCHEMAS)}  (on every available backend)")
    print("backends:")
    for device_type, names in backends.SUPPORTED.items():
        chosen = backends.resolve(None, device_type) if backends.availability("reference", device_type)[0] else None
        for name in names:
            ok, why = backends.availability(name, device_type)
            mark = "yes" if ok else "no "
            default = "  [default]" if name == chosen else ""
            print(f"  {device_type:<5} {name:<10} {mark}  {why}{default}")
    return 0


def _add_training_options(p, d, *, per_run: bool) -> None:
    """The options `zokern finetune` and `zokern compare` share; per_run: finetune's own (one method, steps,
    evaluation interval, resume)."""
    from zokern.finetune.config import DTYPES, LR_SCHEDULES, PROBE_MODES

    p.add_argument("--model", default=None, help="a local Hugging Face model directory or .gguf file "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", default=d.task, help="'bbc-news' or a JSONL file of {\"text\", \"label\"} lines")
    p.add_argument("--template", default=None, help="prompt with {text}, for a JSONL task")
    p.add_argument("--labels", default=None, help="class=word pairs, e.g. negative=terrible,positive=great")
    numbers = [("batch-size", int), ("lr", float), ("eps", float), ("weight-decay", float), ("eval-examples", int),
               ("seed", int), ("checkpoint-every", int)]
    if per_run:
        numbers += [("steps", int), ("eval-every", int)]
    for name, kind in numbers:
        p.add_argument(f"--{name}", type=kind, default=getattr(d, name.replace("-", "_")), help="default: %(default)s")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="constant, or linear / cosine decay from --lr at the first step towards 0 (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="default: %(default)s")
    p.add_argument("--backend", choices=backends.BACKENDS, default=None)
    if per_run:
        p.add_argument("--forward-budget", type=int, default=d.forward_budget,
                       help="> 0: train for this many forward passes instead of --steps")
        p.add_argument("--evaluations", type=int, default=d.evaluations,
                       help="> 0: evaluate this many times, evenly over the run, instead of every --eval-every")
        p.add_argument("--output-dir", default=d.output_dir)
        p.add_argument("--fsdp", action="store_true",
                       help="under torchrun (2 processes or more): shard the model with FSDP2, each decoder layer "
                            "and the root, instead of holding all of it on every process")
        p.add_argument("--resume", action="store_true",
                       help="continue from --output-dir's newest complete checkpoint (a damaged one is skipped) "
                            "with the run's own settings: a change to one that alters the trajectory (method, "
                            "options, model, task, seed, lr, eps, ...) is an error, as is a run there without a "
                            "checkpoint; an empty or new --output-dir starts a new run")
    p.add_argument("--two-pass", action="store_true", help="fold the next perturbation into the update "
                                                            "(MeZO, SubZero, Sparse MeZO)")
    p.add_argument("--rounding", choices=("nearest", "stochastic"), default=None,
                   help="how updates are stored in 16-bit weights (default: stochastic, unbiased; float32 weights "
                        "store the float32 result either way)")
    p.add_argument("--probe-mode", choices=PROBE_MODES, default=d.probe_mode,
                   help="module: the forward passes see the perturbed weights through transient copies and only the "
                        "update writes the weights (exact probes for 16-bit weights); in-place: perturb and "
                        "restore the weights; auto (default): module for bfloat16/float16 without --two-pass")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="> 0: train LoRA adapters of this rank; 0: all weights")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-targets", default=d.lora_targets, help="comma-separated module names for LoRA")
    p.add_argument("--train-pattern", default=None, help="train only parameters whose names match this regex")


def _add_finetune(sub) -> None:
    from zokern.finetune.config import FinetuneConfig
    from zokern.optim import METHODS

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a language model with a ZO method (default: the embedded "
                                        "SmolLM2-135M on BBC News topics, offline)")
    p.set_defaults(func=finetune_command)
    p.add_argument("--method", choices=sorted(METHODS), default=d.method)
    _add_training_options(p, d, per_run=True)
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a method option, e.g. rank=8, sparsity=0.8, alpha=1e-8, project_every=50")


def _add_compare(sub) -> None:
    from zokern.finetune.compare import METHOD_ORDER
    from zokern.finetune.config import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("compare", help="fine-tune with several ZO methods at an equal budget of forward passes "
                                       "and tabulate and plot the results")
    p.set_defaults(func=compare_command)
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated (default: all five)")
    p.add_argument("--forward-budget", type=int, default=600, help="forward passes per method (default 600)")
    p.add_argument("--evaluations", type=int, default=6, help="validation evaluations per run")
    p.add_argument("--seeds", type=int, default=1, help="runs per method, with seeds --seed, --seed + 1, ...; the "
                                                        "table gives mean ± standard deviation, the plot a band")
    p.add_argument("--only-seed", type=int, default=None, metavar="S",
                   help="train only seed S's runs (one of --seed, ..., --seed + --seeds - 1), in the folders the "
                        "whole comparison uses, and write no table: spread the seeds over processes, then gather "
                        "them with --resume")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--resume", action="store_true",
                   help="take runs already finished under --output-dir with the same settings as they are, and "
                        "continue interrupted ones from their checkpoints")
    _add_training_options(p, d, per_run=False)
    p.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's option, e.g. subzero.rank=4, dizo.project_pattern=k_proj")


def _add_replay(sub) -> None:
    p = sub.add_parser("replay", help="rebuild a finetune run's weights from the base model and its seed log "
                                      "(docs/SEEDLOG.md)")
    p.set_defaults(func=replay_command)
    p.add_argument("--log", required=True, help="the run's seedlog.jsonl")
    p.add_argument("--model", default=None, help="the base model, if not where the log says")
    p.add_argument("--output", default=None, help="safetensors file (default: replayed.safetensors beside the log)")
    p.add_argument("--steps", type=int, default=None, help="replay only the first N steps")


def replay_command(args) -> int:
    from zokern.finetune.config import ConfigError
    from zokern.finetune.model import ModelError
    from zokern.finetune.replay import replay_run
    from zokern.seedlog import SeedLogError

    try:
        replay_run(args.log, model=args.model, output=args.output, steps=args.steps)
    except (SeedLogError, ModelError, ConfigError) as exc:
        print(f"zokern replay: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _parse_option(text: str):
    from zokern.finetune.config import ConfigError

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--option takes NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def finetune_command(args) -> int:
    from zokern.finetune.config import ConfigError, FinetuneConfig
    from zokern.finetune.data import DataError
    from zokern.finetune.model import ModelError
    from zokern.finetune.run_files import CheckpointError
    from zokern.finetune.train import finetune
    from zokern.seedlog import SeedLogError

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "func", "option")}
    try:
        config = FinetuneConfig(**fields, method_options=dict(_parse_option(o) for o in args.option))
        # Settings, data, paths and the checkpoint to resume are checked before the model loads.
        summary = finetune(config)
    except (ConfigError, DataError, ModelError, CheckpointError, SeedLogError) as exc:
        print(f"zokern finetune: error: {exc}", file=sys.stderr)
        return 2
    if summary["final_accuracy"] is None:  # not rank 0 of a torchrun run, which reports for all
        return 0
    print(f"\nzero-shot test accuracy {summary['zero_shot_accuracy']:.3f} -> fine-tuned {summary['final_accuracy']:.3f} "
          f"({summary['steps']} steps, {summary['wall_seconds'] / 60:.1f} min); results in {config.output_dir}")
    return 0


def compare_command(args) -> int:
    from zokern.finetune.compare import check_settings, compare
    from zokern.finetune.config import FinetuneConfig
    from zokern.finetune.data import DataError
    from zokern.finetune.model import ModelError, resolve_model_path
    from zokern.finetune.train import load_task
    from zokern.optim import METHODS

    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "func", "option", "methods", "forward_budget", "evaluations", "seeds", "resume",
                           "only_seed")}
    try:
        check_settings(args.forward_budget, args.seeds)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(METHODS)}")
        options: dict = {m: {} for m in methods}
        for text in args.option:
            method, dot, rest = text.partition(".")
            if not dot or method not in options:
                raise ValueError(f"--option takes METHOD.NAME=VALUE for one of {', '.join(methods)}, got {text!r}")
            options[method].update([_parse_option(rest)])
        base = FinetuneConfig(**fields)
        load_task(base)
        resolve_model_path(base.model)
        # compare checks every run's settings before the model loads and the first run trains
        result = compare(base, methods, args.forward_budget, evaluations=args.evaluations, method_options=options,
                         seeds=args.seeds, resume=args.resume, only_seed=args.only_seed)
    except (DataError, ModelError, ValueError) as exc:  # ConfigError, CheckpointError are ValueErrors
        print(f"zokern compare: error: {exc}", file=sys.stderr)
        return 2
    if args.only_seed is not None:
        print(f"seed {args.only_seed}: {len(result['summaries'])} run(s) under {base.output_dir}; the same command "
              "without --only-seed and with --resume gathers the comparison")
        return 0
    print("\n" + (Path(base.output_dir) / "comparison.md").read_text())
    return 0 if result["runs"] else 1


def demo_command(args) -> int:
    from zokern.demo import run_demo

    result = run_demo(steps=args.steps, lr=args.lr, eps=args.eps, seed=args.seed, backend=args.backend)
    return 0 if result["final_accuracy"] > result["initial_accuracy"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The command line; each subcommand's parser names its handler (`func`), called with the parsed args."""
    parser = argparse.ArgumentParser(prog="zokern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends and ops are available here (and why not)"
                   ).set_defaults(func=info_command)
    demo = sub.add_parser("demo", help="a small end-to-end MeZO run on the fused ops (CPU, seconds)")
    demo.set_defaults(func=demo_command)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--lr", type=float, default=2e-2)
    demo.add_argument("--eps", type=float, default=1e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=backends.BACKENDS, default=None)
    _add_finetune(sub)
    _add_compare(sub)
    _add_replay(sub)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
