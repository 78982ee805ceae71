"""zokern finetune and replay under faults: a run killed at every file operation of its checkpoint saves
resumes to the uninterrupted run's weights, seed log and metrics; damaged checkpoints and metrics are
recovered from; a resume with other settings, bad settings and malformed seed logs get one line and exit 2
before the model loads."""
import copy
import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import zokern.finetune.config as finetune_config  # noqa: E402
import zokern.finetune.run_files as run_files  # noqa: E402
import zokern.finetune.train as train  # noqa: E402
from zokern.cli import main  # noqa: E402
from conftest import tiny_run_config  # noqa: E402
from zokern.finetune.config import FinetuneConfig  # noqa: E402
from zokern.finetune.run_files import CheckpointError  # noqa: E402
from zokern.finetune.train import finetune  # noqa: E402

SINK = open(os.devnull, "w")
TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": f"review number {i}", "label": "pos" if i % 3 else "neg"}) + "\n"
                            for i in range(30)))
    return path


@pytest.fixture
def fast_load(tiny_model_dir, monkeypatch):
    """The tiny model loaded once and copied per run, and no plots: many short runs."""
    loaded = train.load_model(str(tiny_model_dir))
    monkeypatch.setattr(train, "load_model", lambda path, dtype: (copy.deepcopy(loaded[0]), loaded[1]))
    monkeypatch.setattr(train, "_plot", lambda run: None)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails any model load: an error reported with this in place came before the model loaded."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "load_model", load_model)


def _config(tiny_model_dir, task_file, out, **kw):
    """3 steps, a checkpoint after each (checkpoint-1 is rotated out at step 3), two-pass MeZO with an
    evaluation after step 2, and the final save that rewrites checkpoint-3 without the pending perturbation."""
    return tiny_run_config(**{**dict(model=str(tiny_model_dir), task=str(task_file), template=TEMPLATE,
                                     labels="neg=bad,pos=good", output_dir=str(out), steps=3, eval_every=2,
                                     checkpoint_every=1, lr=1e-3, eps=1e-3, two_pass=True, zero_shot_eval=False),
                              **kw})


def _outcome(out: Path) -> dict:
    """What a run leaves that must not depend on how often it was killed and resumed."""
    from safetensors.torch import load_file

    header, *records = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()]
    header["config"].pop("output_dir")  # the only setting that differs between the compared runs
    return {"weights": load_file(str(out / "checkpoint" / "model.safetensors")), "seedlog": (header, records),
            "metrics": (out / "metrics.jsonl").read_text(), "files": sorted(p.name for p in out.glob("checkpoint*"))}


def _assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["seedlog"] == b["seedlog"] and a["metrics"] == b["metrics"] and a["files"] == b["files"]


class Kill:
    """Raises SystemExit at the k-th file operation of a checkpoint save, as a kill would stop the process
    there: a file being written is left cut short, a directory being removed half removed."""

    def __init__(self, monkeypatch, at: int):
        self.at, self.count, self.active = at, 0, False
        save = run_files.Run.save_checkpoint

        def save_checkpoint(run, *args):
            self.active = True
            try:
                save(run, *args)
            finally:
                self.active = False

        monkeypatch.setattr(run_files.Run, "save_checkpoint", save_checkpoint)
        for module, name, kind in ((os, "replace", "before"), (os, "rename", "before"), (os, "symlink", "before"),
                                   (os, "mkdir", "before"),
                                   (shutil, "rmtree", "partial_rmtree"), (torch, "save", "torn_write"),
                                   (Path, "write_text", "torn_write"), (Path, "write_bytes", "torn_write")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), kind))
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", self._wrap(safetensors.torch.save_file, "torn_write"))

    def _wrap(self, real, kind):
        def operation(*args, **kwargs):
            if not self.active:
                return real(*args, **kwargs)
            self.count += 1
            if self.count != self.at:
                return real(*args, **kwargs)
            if kind == "torn_write":
                real(*args, **kwargs)
                path = Path(args[0] if real.__name__.startswith("write_") else args[1])
                with open(path, "r+b") as f:
                    f.truncate(path.stat().st_size // 2)
            elif kind == "partial_rmtree":
                files = sorted(p for p in Path(args[0]).rglob("*") if p.is_file())
                if files:
                    os.remove(files[0])
            raise SystemExit(f"killed at file operation {self.count}")
        return operation


def test_kill_at_every_checkpoint_file_operation_then_resume(tiny_model_dir, task_file, tmp_path, fast_load,
                                                             monkeypatch):
    finetune(_config(tiny_model_dir, task_file, tmp_path / "straight"), progress_stream=SINK)
    expected = _outcome(tmp_path / "straight")
    assert expected["files"] == ["checkpoint", "checkpoint-2", "checkpoint-3"]

    with monkeypatch.context() as m:
        counter = Kill(m, at=0)
        finetune(_config(tiny_model_dir, task_file, tmp_path / "counted"), progress_stream=SINK)
    operations = counter.count
    assert operations >= 4 * 6  # four saves of several operations each

    for k in range(1, operations + 1):
        out = tmp_path / f"killed-{k}"
        with monkeypatch.context() as m:
            Kill(m, at=k)
            with pytest.raises(SystemExit):
                finetune(_config(tiny_model_dir, task_file, out), progress_stream=SINK)
        if any(run_files.CHECKPOINT_NAME.fullmatch(p.name) for p in out.iterdir()):
            finetune(_config(tiny_model_dir, task_file, out, resume=True), progress_stream=SINK)
        else:  # killed before the first checkpoint was complete: --resume refuses, the run starts over
            with pytest.raises(CheckpointError, match="no complete checkpoint"):
                finetune(_config(tiny_model_dir, task_file, out, resume=True), progress_stream=SINK)
            finetune(_config(tiny_model_dir, task_file, out), progress_stream=SINK)
        _assert_same(_outcome(out), expected)


def _run(tiny_model_dir, task_file, out, **kw):
    finetune(_config(tiny_model_dir, task_file, out, **kw), progress_stream=SINK)
    return out


def test_resume_falls_back_past_a_damaged_checkpoint(tiny_model_dir, task_file, tmp_path, fast_load, capsys):
    expected = _outcome(_run(tiny_model_dir, task_file, tmp_path / "straight"))
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "straight", out, symlinks=True)
    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short
    finetune(_config(tiny_model_dir, task_file, out, resume=True), progress_stream=sys.stderr)
    err = capsys.readouterr().err
    assert "skipping checkpoint-3: model.safetensors does not match its recorded sha256" in err
    assert "resuming from checkpoint-2 (step 2)" in err
    _assert_same(_outcome(out), expected)


def test_resume_skips_a_checkpoint_past_the_end_of_the_seed_log(tiny_model_dir, task_file, tmp_path, fast_load,
                                                                capsys):
    """A seed log that lost its last lines (e.g. to a crash of the machine) cannot continue from there."""
    expected = _outcome(_run(tiny_model_dir, task_file, tmp_path / "straight"))
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "straight", out, symlinks=True)
    lines = (out / "seedlog.jsonl").read_text().splitlines(keepends=True)
    (out / "seedlog.jsonl").write_text("".join(lines[:3]))  # header and steps 0, 1
    finetune(_config(tiny_model_dir, task_file, out, resume=True), progress_stream=sys.stderr)
    err = capsys.readouterr().err
    assert "skipping checkpoint-3: the seed log ends at step 2" in err and "resuming from checkpoint-2" in err
    _assert_same(_outcome(out), expected)


def test_resume_compares_only_trajectory_settings_and_paths_as_absolute(tmp_path, monkeypatch):
    from dataclasses import asdict

    monkeypatch.chdir(tmp_path)
    recorded = asdict(tiny_run_config(model=str(tmp_path / "model"), task=str(tmp_path / "t.jsonl"), steps=100))
    finetune_config.check_resumable(recorded, tiny_run_config(model="model", task="t.jsonl", steps=300, eval_every=7,
                                                   evaluations=3, eval_examples=9, checkpoint_every=5, resume=True,
                                                   output_dir="elsewhere", forward_budget=10, zero_shot_eval=False))
    for change in (dict(eps=0.1), dict(two_pass=True), dict(lora_rank=4), dict(train_pattern="norm"),
                   dict(dtype="bfloat16"), dict(batch_size=8), dict(task="other.jsonl"), dict(backend="reference"),
                   dict(lr_schedule="cosine")):
        with pytest.raises(finetune_config.ConfigError, match=f"{next(iter(change))} "):
            finetune_config.check_resumable(recorded, FinetuneConfig(**{**recorded, "model": "model", "task": "t.jsonl",
                                                              **change}))


def test_resume_drops_a_torn_metrics_line_and_stale_leftovers(tiny_model_dir, task_file, tmp_path, fast_load):
    expected = _outcome(_run(tiny_model_dir, task_file, tmp_path / "straight"))
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "straight", out, symlinks=True)
    shutil.rmtree(out / "checkpoint-3")  # killed in step 3, before its checkpoint
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(metrics[:2]) + "\n" + metrics[2][:20])  # ... while logging it
    (out / "checkpoint-5.tmp").mkdir()
    (out / "checkpoint-5.tmp" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoint-1.del").mkdir()
    _run(tiny_model_dir, task_file, out, resume=True)
    _assert_same(_outcome(out), expected)  # also: no .tmp or .del left


def test_resume_refuses_a_corrupt_metrics_line_before_the_end(tiny_model_dir, task_file, tmp_path, fast_load,
                                                              monkeypatch):
    out = _run(tiny_model_dir, task_file, tmp_path / "run", steps=2)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(["{not json"] + lines) + "\n")
    monkeypatch.setattr(train, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(CheckpointError, match="metrics.jsonl:1 is not a JSON record"):
        _run(tiny_model_dir, task_file, out, resume=True)


def test_a_new_run_removes_an_earlier_runs_checkpoints(tiny_model_dir, task_file, tmp_path, fast_load):
    """Else a --resume after a kill before the new run's first checkpoint would continue the old run."""
    out = _run(tiny_model_dir, task_file, tmp_path / "run")
    _run(tiny_model_dir, task_file, out, steps=1, checkpoint_every=0)
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint", "checkpoint-1"]


def test_checkpoint_state_is_loaded_without_unpickling_code(tiny_model_dir, task_file, tmp_path, fast_load):
    out = _run(tiny_model_dir, task_file, tmp_path / "run", steps=2)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for name in ("checkpoint-1", "checkpoint-2"):
        state = out / name / "optimizer.pt"
        state.write_bytes(pickle.dumps(Payload()))
        progress = json.loads((out / name / "progress.json").read_text())
        progress["sha256"]["optimizer.pt"] = run_files._sha256(state)
        (out / name / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        _run(tiny_model_dir, task_file, out, resume=True)
    assert not marker.exists()


def _finetune_args(tiny_model_dir, task_file, out, *extra):
    return ["finetune", "--model", str(tiny_model_dir), "--task", str(task_file), "--template", TEMPLATE,
            "--labels", "neg=bad,pos=good", "--output-dir", str(out), "--steps", "2", "--batch-size", "4",
            "--eval-examples", "4", "--lora-rank", "0", "--checkpoint-every", "1", "--lr", "1e-3", "--lr-schedule",
            "constant", "--dtype", "float32", *extra]


@pytest.mark.parametrize("change,message", [
    (["--method", "subzero"], "method 'mezo' -> 'subzero'"),
    (["--lr", "0.01"], "lr 0.001 -> 0.01"),
    (["--seed", "3"], "seed 0 -> 3"),
    (["--option", "on_nonfinite=raise"], "method_options {} -> {'on_nonfinite': 'raise'}"),
])
def test_resume_with_other_settings_is_refused_before_the_model_loads(tiny_model_dir, task_file, tmp_path,
                                                                     fast_load, monkeypatch, capsys, change, message):
    out = tmp_path / "run"
    assert main(_finetune_args(tiny_model_dir, task_file, out)) == 0
    log = (out / "seedlog.jsonl").read_bytes()
    monkeypatch.setattr(train, "load_model", lambda *a: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(_finetune_args(tiny_model_dir, task_file, out, "--resume", "--steps", "3", *change)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--resume" in err
    assert (out / "seedlog.jsonl").read_bytes() == log


def test_resume_without_a_checkpoint(tiny_model_dir, task_file, tmp_path, fast_load, capsys):
    """A directory with a run but no complete checkpoint is an error (not a silent restart that would
    overwrite its seed log); a new or empty one starts a new run."""
    out = tmp_path / "run"
    assert main(_finetune_args(tiny_model_dir, task_file, out, "--checkpoint-every", "0", "--steps", "1")) == 0
    shutil.rmtree(out / "checkpoint-1")
    log = (out / "seedlog.jsonl").read_bytes()
    capsys.readouterr()
    assert main(_finetune_args(tiny_model_dir, task_file, out, "--resume")) == 2
    assert "holds a run but no complete checkpoint" in capsys.readouterr().err
    assert (out / "seedlog.jsonl").read_bytes() == log
    assert main(_finetune_args(tiny_model_dir, task_file, tmp_path / "new", "--resume")) == 0
    assert "nothing in" in capsys.readouterr().err and (tmp_path / "new" / "checkpoint-2").is_dir()


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
    (["--eps", "0"], "--eps must be a positive finite number, got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--steps", "-1"], "--steps must be an integer >= 1, got -1"),
    (["--lora-rank", "-3"], "--lora-rank must be an integer >= 0, got -3"),
    (["--eval-examples", "0"], "--eval-examples must be an integer >= 1, got 0"),
    (["--train-pattern", "("], "--train-pattern '(' is not a regular expression"),
    (["--option", "bogus=3"], "--option bogus: mezo has no such option"),
    (["--option", "lr=3"], "--option lr: set it with --lr"),
    (["--option", "=3"], "--option takes NAME=VALUE"),
    (["--option", "dist=uniform"], "--option dist: unknown distribution 'uniform'"),
    (["--template", "{text} {topic}"], "--template has the field {topic}"),
    (["--template", "{text"], "--template '{text'"),
    (["--labels", "neg=bad,pos=bad"], "--labels maps two classes to the word 'bad'"),
    (["--labels", "neg=bad,neg=good"], "--labels names class 'neg' twice"),
    (["--method", "hizoo", "--two-pass"], "--two-pass: hizoo has no two-pass mode"),
    (["--method", "subzero", "--weight-decay", "0.1"], "--weight-decay: subzero has no weight decay"),
])
def test_cli_rejects_bad_settings_before_the_model_loads(tiny_model_dir, task_file, tmp_path, no_model_load, capsys,
                                                         args, message):
    assert main(_finetune_args(tiny_model_dir, task_file, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("args,message", [
    (["--method", "subzero", "--option", "rank=-3"], "subzero with --option {'rank': -3}: "),
    (["--method", "dizo", "--option", "project_pattern=no_such_tensor"], "no_such_tensor"),
    (["--method", "dizo", "--option", "project_every=0"], "project_every must be an integer >= 1, got 0"),
    (["--method", "dizo", "--option", "gamma_range=1.5"], "gamma_range must be in (0, 1)"),
    (["--train-pattern", "no_such_tensor"], "--train-pattern 'no_such_tensor' matches no trainable parameter"),
])
def test_cli_rejects_option_values_the_optimizer_refuses(tiny_model_dir, task_file, tmp_path, fast_load, capsys,
                                                         args, message):
    """An option value only the optimizer can judge (a rank, a pattern that selects nothing): one line, exit 2."""
    assert main(_finetune_args(tiny_model_dir, task_file, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("zokern finetune: error: ") and err.count("\n") == 1 and message in err, err


def test_cli_rejects_bad_paths_before_the_model_loads(tiny_model_dir, task_file, tmp_path, no_model_load, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(task_file.read_bytes().replace(b"review", b"r\xe9view"))
    args = _finetune_args(tiny_model_dir, latin, tmp_path / "run")
    assert main(args) == 2
    assert f"task file {latin} is not UTF-8 text" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(_finetune_args(tiny_model_dir, task_file, blocker / "run")) == 2
    assert f"--output-dir {blocker / 'run'}: it or a folder above it is a file" in capsys.readouterr().err


@pytest.fixture
def logged_run(tiny_model_dir, task_file, tmp_path, fast_load):
    """A finished 2-step HiZOO run's seed log (HiZOO: records carry hess_scale)."""
    out = _run(tiny_model_dir, task_file, tmp_path / "run", method="hizoo", steps=2, two_pass=False)
    return out / "seedlog.jsonl"


def _edit_record(line: str, **changes) -> str:
    record = json.loads(line)
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record)


@pytest.mark.parametrize("damage,message", [
    (lambda h, r: (h, [_edit_record(r[0], grad="abc"), r[1]]), ":2: 'grad' must be a finite number, got 'abc'"),
    (lambda h, r: (h, [r[0].replace('"grad":', '"grad":NaN,"x":'), r[1]]), ":2: 'grad' must be a finite number"),
    (lambda h, r: (h, [_edit_record(r[0], lr=None), r[1]]), ":2: the record lacks 'lr'"),
    (lambda h, r: (h, [r[0], _edit_record(r[1], hess_scale=None)]), "record 1 lacks 'hess_scale'"),
    (lambda h, r: (h, [r[0], _edit_record(r[1], seed=5)]), "record 1 has seed 5"),
    (lambda h, r: (h, [_edit_record(r[0], merged=0), r[1]]), ":2: 'merged' must be a positive integer (or true), got 0"),
    (lambda h, r: (h, ["[1, 2]", r[1]]), ":2: a record must be a JSON object"),
    (lambda h, r: (h, ["{torn", r[1]]), ":2 is not a JSON line"),
    (lambda h, r: (_edit_record(h, config=None), r), "the header has no 'config'"),
    (lambda h, r: (_edit_record(h, config={**json.loads(h)["config"], "shiny": 1}), r), "unknown setting 'shiny'"),
    (lambda h, r: (_edit_record(h, config={**json.loads(h)["config"], "lr": "fast"}), r),
     "the header's config is invalid: --lr must be a number, got 'fast'"),
    (lambda h, r: (_edit_record(h, config={**json.loads(h)["config"], "lora_targets": 5}), r),
     "the header's config is invalid: --lora-targets must be a string, got 5"),
    (lambda h, r: (_edit_record(h, trainable=None), r), "the header's 'trainable' is missing"),
    (lambda h, r: (_edit_record(h, backend="abacus"), r), "the header's 'backend' is missing or malformed"),
])
def test_replay_rejects_a_malformed_log_before_the_model_loads(logged_run, no_model_load, capsys, damage, message):
    header, *records = logged_run.read_text().splitlines()
    header, records = damage(header, records)
    logged_run.write_text("\n".join([header, *records]) + "\n")
    assert main(["replay", "--log", str(logged_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_replay_rejects_a_non_utf8_log_and_a_missing_output_folder(logged_run, no_model_load, tmp_path, capsys):
    assert main(["replay", "--log", str(logged_run), "--output", str(tmp_path / "no" / "w.safetensors")]) == 2
    assert f"folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    logged_run.write_bytes(logged_run.read_bytes().replace(b'"hizoo"', b'"hiz\xf6o"', 1))
    assert main(["replay", "--log", str(logged_run)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_replay_of_the_checked_log_still_matches(logged_run, tiny_model_dir, capsys):
    """The checks accept what finetune writes: HiZOO's log replays to its checkpoint."""
    from safetensors.torch import load_file

    assert main(["replay", "--log", str(logged_run)]) == 0
    replayed = load_file(str(logged_run.with_name("replayed.safetensors")))
    trained = load_file(str(logged_run.with_name("checkpoint") / "model.safetensors"))
    assert trained.keys() == replayed.keys() and all(torch.equal(trained[k], replayed[k]) for k in trained)
    assert not any(math.isnan(float(t.sum())) for t in replayed.values())


def test_replay_of_an_older_stream_on_a_changed_backend_warns(logged_run, capsys):
    """A log of a random stream version older than the C++ CPU kernels' last change (VALUES_SINCE) replayed on
    them: the replay runs and says its weights may be close, not bitwise; a log of the current version on the same
    backend says nothing."""
    from zokern import backends
    from zokern.random import STREAM_VERSION, VALUES_SINCE
    if not backends.availability("cpp", "cpu")[0]:
        pytest.skip("cpp backend unavailable")
    header, *records = logged_run.read_text().splitlines()
    since = VALUES_SINCE["cpp"]
    for version, warned in ((since - 1, True), (STREAM_VERSION, False)):
        logged_run.write_text("\n".join([_edit_record(header, backend="cpp", stream_version=version), *records]) + "\n")
        assert main(["replay", "--log", str(logged_run)]) == 0
        err = capsys.readouterr().err
        warning = f"warning: the run drew from random stream version {since - 1}; backend 'cpp' computes differently"
        assert (warning in err) == warned, err
