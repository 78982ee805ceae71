"""`zokern compare`: the ZO methods fine-tuned on one task at an equal budget of forward passes (the unit
a ZO step costs: HiZOO takes 3 per step, DiZO 2 + 2J/κ, the others 2), with the same data, seed, model and
hyperparameters, one `zokern finetune` run per method under --output-dir. Writes comparison.json, a
Markdown table (comparison.md) and validation accuracy and training loss against forward passes
(comparison.png)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from zokern.finetune.train import FinetuneConfig, Run, finetune
from zokern.optim import METHODS

METHOD_ORDER = ("mezo", "subzero", "sparse-mezo", "hizoo", "dizo")


def compare(base: FinetuneConfig, methods: "list[str]", forward_budget: int, evaluations: int = 6,
            method_options: "dict[str, dict] | None" = None, progress_stream=sys.stderr) -> dict:
    """One run per method (with method_options[method], if any); the zero-shot test accuracy is measured
    once (the untrained model is the same for all)."""
    if forward_budget <= 0:
        raise ValueError(f"the forward budget must be positive, got {forward_budget}")
    out = Path(base.output_dir)
    rows, zero_shot = [], None
    for i, method in enumerate(methods):
        # Steps differ by method; the same number of evaluations each puts them at the same forward passes.
        config = replace(base, method=method, forward_budget=forward_budget, output_dir=str(out / method),
                         zero_shot_eval=i == 0, resume=False, evaluations=evaluations,
                         two_pass=base.two_pass and METHODS[method].two_pass_supported,
                         method_options=(method_options or {}).get(method, {}))
        print(f"== {method}: {forward_budget} forward passes", file=progress_stream)
        summary = finetune(config, progress_stream=progress_stream)
        zero_shot = summary["zero_shot_accuracy"] if i == 0 else zero_shot
        rows.append({"method": method, "steps": summary["steps"], "forwards": summary["forwards"],
                     "final_accuracy": summary["final_accuracy"],
                     "best_validation_accuracy": summary["best_validation_accuracy"],
                     "train_seconds": summary["steps"] / summary["steps_per_second"],
                     "wall_seconds": summary["wall_seconds"], "peak_memory_bytes": summary["peak_memory_bytes"],
                     "nonfinite_steps": summary["nonfinite_steps"]})
    result = {"task": summary["task"], "forward_budget": forward_budget, "zero_shot_accuracy": zero_shot,
              "device": summary["device"], "backend": summary["backend"], "versions": summary["versions"],
              "hyperparameters": {k: v for k, v in summary["hyperparameters"].items()
                                  if k not in ("method", "output_dir", "steps", "eval_every", "evaluations", "zero_shot_eval",
                                               "forward_budget", "resume")},
              "runs": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown_table(result) + "\n")
    plot(out, methods)
    return result


def markdown_table(result: dict) -> str:
    h = result["hyperparameters"]
    # On the CPU the peak is the process's resident set so far (getrusage cannot be reset between runs).
    memory = "peak RSS so far" if result["device"].startswith("cpu") else "peak GPU memory"
    lines = [f"{result['task']}, {result['forward_budget']} forward passes per method, batch {h['batch_size']}, "
             f"lr {h['lr']:g}, ε {h['eps']:g}, LoRA rank {h['lora_rank'] or 'none (all weights)'}, "
             f"{h['dtype']}, seed {h['seed']}; {result['device']}, backend {result['backend']}. "
             f"Zero-shot test accuracy {100 * result['zero_shot_accuracy']:.1f}%.", "",
             f"| method | steps | forward passes | test accuracy | best validation | train time | {memory} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['steps']} | {r['forwards']} | {100 * r['final_accuracy']:.1f}% | "
                     f"{100 * r['best_validation_accuracy']:.1f}% | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def plot(out: Path, methods: "list[str]") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        records = Run(str(out / method)).records()
        evals = [(r["forwards"], r["validation_accuracy"]) for r in records if "validation_accuracy" in r]
        losses = [(r["forwards"], r["loss"]) for r in records if "loss" in r]
        if evals:
            acc.plot(*zip(*evals), marker="o", label=method)
        if losses:
            xs, ys = zip(*losses)
            window = max(1, len(ys) // 20)  # a moving average: single-batch ZO losses are noisy
            smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                      for i in range(len(ys))]
            loss.plot(xs, smooth, label=method)
    for ax, ylabel in ((acc, "validation accuracy"), (loss, "training loss (moving average)")):
        ax.set_xlabel("forward passes")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
