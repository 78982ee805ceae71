"""`zokern compare`: the ZO methods fine-tuned on one task at an equal budget of forward passes (the unit
a ZO step costs: HiZOO takes 3 per step, DiZO 2 + 2J/κ, the others 2), with the same data, seeds, model and
hyperparameters, one `zokern finetune` run per method and seed under --output-dir. Writes comparison.json,
a Markdown table (comparison.md: test accuracy as mean ± standard deviation over the seeds) and validation
accuracy and training loss against forward passes (comparison.png: the mean over the seeds with a ±1
standard deviation band)."""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

from zokern.finetune.config import FinetuneConfig, check_config, unused_settings
from zokern.finetune.run_files import Run
from zokern.finetune.train import finetune
from zokern.optim import METHODS

METHOD_ORDER = ("mezo", "subzero", "sparse-mezo", "hizoo", "dizo")


def run_dir(out: Path, method: str, seed: int, seeds: "list[int]") -> Path:
    """A run's directory: out/METHOD with one seed, out/METHOD/seed-S with several."""
    return out / method if len(seeds) == 1 else out / method / f"seed-{seed}"


def _mean_sd(values: "list[float]") -> "tuple[float, float]":
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def check_settings(forward_budget: int, seeds: int) -> None:
    if forward_budget <= 0:
        raise ValueError(f"the forward budget must be positive, got {forward_budget}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")


def run_configs(base: FinetuneConfig, methods: "list[str]", forward_budget: int, evaluations: int = 6,
                method_options: "dict[str, dict] | None" = None, seeds: int = 1) -> "list[tuple[str, FinetuneConfig]]":
    """Every run's (method, config), in order: seeds base.seed, ..., base.seed + seeds − 1 per method, with
    method_options[method], two-pass mode and weight decay where the method has them, and the zero-shot test
    accuracy measured by the first run only (the untrained model is the same for all: LoRA's B starts at zero).
    Steps differ by method; the same number of evaluations each puts them at the same forward passes."""
    out, run_seeds = Path(base.output_dir), [base.seed + i for i in range(seeds)]
    return [(method, replace(base, method=method, seed=seed, forward_budget=forward_budget,
                             output_dir=str(run_dir(out, method, seed, run_seeds)), resume=False,
                             zero_shot_eval=(method, seed) == (methods[0], base.seed), evaluations=evaluations,
                             two_pass=base.two_pass and METHODS[method].two_pass_supported,
                             weight_decay=base.weight_decay if METHODS[method].weight_decay_supported else 0.0,
                             method_options=(method_options or {}).get(method, {})))
            for method in methods for seed in run_seeds]


def completed_summary(config: FinetuneConfig) -> "dict | None":
    """The summary of a finished run in config.output_dir with the same settings (who measured the zero-shot
    accuracy, and settings both runs override, such as --steps under the forward budget, aside), or None."""
    path = Path(config.output_dir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    requested = json.loads(json.dumps(asdict(config)))
    recorded = summary.get("hyperparameters", {})
    ignored = {"resume", "zero_shot_eval"} | (unused_settings(recorded) & unused_settings(requested))
    recorded = {k: v for k, v in recorded.items() if k not in ignored}
    requested = {k: v for k, v in requested.items() if k not in ignored}
    return summary if recorded == requested else None


def _run(method: str, config: FinetuneConfig, forward_budget: int, resume: bool, progress_stream) -> dict:
    """One run's summary: taken as it is where `resume` finds it finished with the same settings, else trained
    (continuing from its newest checkpoint with `resume`)."""
    summary = completed_summary(config) if resume else None
    if summary is not None:
        print(f"== {method}, seed {config.seed}: finished in {config.output_dir}, taken as it is", file=progress_stream)
        return summary
    print(f"== {method}, seed {config.seed}: {forward_budget} forward passes", file=progress_stream)
    return finetune(replace(config, resume=resume), progress_stream=progress_stream)


def compare(base: FinetuneConfig, methods: "list[str]", forward_budget: int, evaluations: int = 6,
            method_options: "dict[str, dict] | None" = None, seeds: int = 1, resume: bool = False,
            only_seed: "int | None" = None, progress_stream=sys.stderr) -> dict:
    """Runs of every method over `seeds` seeds (run_configs), every run's settings checked before the first
    trains. With `resume`, a run already finished under the output folder with the same settings is taken as it
    is, and an interrupted one continues from its newest checkpoint (so a comparison can be completed, or its
    runs spread over several processes and gathered by a last call). `only_seed`, one of the comparison's seeds:
    train that seed's runs alone, in the folders the whole comparison uses, and write no table (a process's
    share of a comparison spread by seed; {"only_seed": S, "summaries": [...]})."""
    check_settings(forward_budget, seeds)
    configs = run_configs(base, methods, forward_budget, evaluations, method_options, seeds)
    for _, config in configs:
        check_config(config)
    out, run_seeds = Path(base.output_dir), [c.seed for m, c in configs if m == methods[0]]
    if only_seed is not None:
        if only_seed not in run_seeds:
            raise ValueError(f"--only-seed {only_seed} is not one of the comparison's seeds "
                             f"({', '.join(map(str, run_seeds))}: --seed and --seeds set them)")
        return {"only_seed": only_seed, "summaries": [_run(m, c, forward_budget, resume, progress_stream)
                                                      for m, c in configs if c.seed == only_seed]}
    rows, zero_shot = [], None
    for method in methods:
        summaries = []
        for config in [c for m, c in configs if m == method]:
            summary = _run(method, config, forward_budget, resume, progress_stream)
            if zero_shot is None:
                zero_shot = summary["zero_shot_accuracy"]
            summaries.append(summary)
        accuracy, accuracy_sd = _mean_sd([s["final_accuracy"] for s in summaries])
        best, best_sd = _mean_sd([s["best_validation_accuracy"] for s in summaries])
        rows.append({"method": method, "steps": summary["steps"], "forwards": summary["forwards"],
                     "final_accuracy": accuracy, "final_accuracy_sd": accuracy_sd,
                     "final_accuracies": [s["final_accuracy"] for s in summaries],
                     "best_validation_accuracy": best, "best_validation_accuracy_sd": best_sd,
                     "train_seconds": statistics.fmean(s["steps"] / s["steps_per_second"] for s in summaries),
                     "wall_seconds": sum(s["wall_seconds"] for s in summaries),
                     "peak_memory_bytes": max(s["peak_memory_bytes"] for s in summaries),
                     "nonfinite_steps": sum(s["nonfinite_steps"] for s in summaries)})
    result = {"task": summary["task"], "forward_budget": forward_budget, "seeds": run_seeds,
              "zero_shot_accuracy": zero_shot, "device": summary["device"], "backend": summary["backend"],
              "versions": summary["versions"],
              "hyperparameters": {k: v for k, v in summary["hyperparameters"].items()
                                  if k not in ("method", "output_dir", "steps", "eval_every", "evaluations", "zero_shot_eval",
                                               "forward_budget", "resume", "seed")},
              "runs": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown_table(result) + "\n")
    plot(out, methods, run_seeds)
    return result


def markdown_table(result: dict) -> str:
    h, seeds = result["hyperparameters"], result["seeds"]
    # On the CPU the peak is the process's resident set so far (getrusage cannot be reset between runs).
    memory = "peak RSS so far" if result["device"].startswith("cpu") else "peak GPU memory"
    seeding = f"seed {seeds[0]}" if len(seeds) == 1 else \
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}; mean ± standard deviation)"
    lines = [f"{result['task']}, {result['forward_budget']} forward passes per method, batch {h['batch_size']}, "
             f"lr {h['lr']:g}, ε {h['eps']:g}, LoRA rank {h['lora_rank'] or 'none (all weights)'}, "
             f"{h['dtype']}, {seeding}; {result['device']}, backend {result['backend']}. "
             f"Zero-shot test accuracy {100 * result['zero_shot_accuracy']:.1f}%.", "",
             f"| method | steps | forward passes | test accuracy | best validation | train time | {memory} |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def percent(row, key):
        return f"{100 * row[key]:.1f}%" if len(seeds) == 1 else \
            f"{100 * row[key]:.1f} ± {100 * row[key + '_sd']:.1f}%"

    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['steps']} | {r['forwards']} | {percent(r, 'final_accuracy')} | "
                     f"{percent(r, 'best_validation_accuracy')} | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def _moving_average(ys: "list[float]") -> "list[float]":
    window = max(1, len(ys) // 20)  # single-batch ZO losses are noisy
    return [statistics.fmean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]


def plot(out: Path, methods: "list[str]", seeds: "list[int]") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        runs = [Run(str(run_dir(out, method, seed, seeds))).records() for seed in seeds]
        # Every seed of a method evaluates and logs at the same steps, so at the same forward passes.
        for ax, key, smooth in ((acc, "validation_accuracy", None), (loss, "loss", _moving_average)):
            curves = [[(r["forwards"], r[key]) for r in records if key in r] for records in runs]
            if not curves[0]:
                continue
            xs = [x for x, _ in curves[0]]
            ys = [[y for _, y in curve] for curve in curves]
            if smooth:
                ys = [smooth(curve) for curve in ys]
            stats = [_mean_sd(list(column)) for column in zip(*ys)]
            mean = [m for m, _ in stats]
            line, = ax.plot(xs, mean, marker="o" if smooth is None else None, label=method)
            if len(seeds) > 1:
                ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(),
                                alpha=0.2, linewidth=0)
    if len(seeds) > 1:
        fig.suptitle(f"mean over {len(seeds)} seeds, band ±1 standard deviation")
    for ax, ylabel in ((acc, "validation accuracy"), (loss, "training loss (moving average)")):
        ax.set_xlabel("forward passes")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
