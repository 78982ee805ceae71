"""ZO on torch.distributed (docs/DISTRIBUTED.md): CPU processes on gloo, spawned from the test, each run
under a timeout so that a hang fails instead of blocking.

Data parallel: 2 processes with uneven shares of a batch against 1 process with the whole batch.
"""
from __future__ import annotations

import json
import math
import os
import traceback
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from zokern.optim import METHODS

TIMEOUT_S = 240


def run_ranks(fn, world: int, tmp_path, *args):
    """fn(rank, world, *args) in `world` spawned processes sharing a gloo group; returns their results (by
    rank). A process that raises fails the test with its traceback; one still running after TIMEOUT_S (a
    hang) is killed and fails it too."""
    ctx = mp.get_context("spawn")
    init = tmp_path / f"init-{fn.__name__}-{world}"
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, str(init), str(tmp_path), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of {fn.__name__} did not finish within {TIMEOUT_S} s (a hang)"
    results = []
    for r in range(world):
        out = torch.load(tmp_path / f"result-{fn.__name__}-{r}.pt", weights_only=False)
        assert "error" not in out, f"rank {r} of {fn.__name__} failed:\n{out['error']}"
        results.append(out["value"])
    return results


def _rank_main(fn, rank, world, init, tmp, args):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        out = {"value": fn(rank, world, *args)}
        torch.distributed.destroy_process_group()
    except BaseException:  # reported to the test process
        out = {"error": traceback.format_exc()}
    torch.save(out, os.path.join(tmp, f"result-{fn.__name__}-{rank}.pt"))


# --- a tiny model and its data ----------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    """Names that every method finds something in: k_proj/v_proj matrices (DiZO), biases (dense vectors)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.k_proj = torch.nn.Linear(6, 10, dtype=dtype)
        self.v_proj = torch.nn.Linear(10, 7, dtype=dtype)
        self.out = torch.nn.Linear(7, 1, dtype=dtype)

    def forward(self, x):
        # In float64: a float32 matmul's rounding may depend on the batch size, which data parallel changes.
        h = x.double()
        for layer in (self.k_proj, self.v_proj, self.out):
            h = torch.nn.functional.linear(h, layer.weight.double(), layer.bias.double())
            h = torch.tanh(h) if layer is not self.out else h
        return h


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return Tiny(dtype)


def data(steps: int, batch: int = 7):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 6, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(steps)]


def share_loss(model, x, y):
    """Mean squared error over the rows, summed in float64, with the row count: the weighted mean of the
    shares' means is the whole batch's mean up to float64 rounding."""
    errors = (model(x) - y).double().square().sum(1)
    return errors.sum() / len(x), len(x)


OPTIONS = {"mezo": {}, "subzero": {"rank": 2, "subspace_every": 2}, "sparse-mezo": {"threshold_every": 2},
           "hizoo": {"alpha": 1e-2}, "dizo": {"project_every": 2, "project_iters": 2}}


def make(method, model, **extra):
    return METHODS[method](model.named_parameters(), lr=1e-2, eps=1e-3, seed=5, **OPTIONS[method], **extra)


def train(method, model, batches, rank=0, world=1, **extra):
    """Steps on this rank's share of each batch; returns (ρ per step, records, the trained tensors)."""
    from zokern.distributed import share

    opt = make(method, model, **extra)
    records = []
    opt.record_hook = records.append
    for x, y in batches:
        rows = share(list(range(len(x))), world, rank)
        mine = (x[rows], y[rows])
        fresh = iter(batches[::-1] * 4)

        def fresh_closure():
            fx, fy = next(fresh)
            fr = share(list(range(len(fx))), world, rank)
            return lambda: share_loss(model, fx[fr], fy[fr])

        opt.step(lambda: share_loss(model, *mine), fresh_closure)
    return [r.get("grad") for r in records], records, {n: p.detach().clone() for n, p in model.named_parameters()}


def replayed(method, records, dtype=torch.float32, **extra):
    model = tiny(dtype)
    opt = make(method, model, process_group=False, **extra)
    for record in records:
        opt.replay_step(record)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- data parallel ----------------------------------------------------------------------------------------


def _dp_worker(rank, world, methods, steps):
    batches = data(steps)
    return {m: train(m, tiny(), batches, rank, world) for m in methods}


@pytest.mark.parametrize("methods", [["mezo", "hizoo", "dizo"], ["sparse-mezo", "subzero"]])
def test_data_parallel_matches_one_process(tmp_path, methods):
    """2 processes, shares of 4 and 3 rows: ρ equals the 1-process run's up to the loss reduction's rounding;
    every rank holds the same weights, bitwise those of a 1-process replay of the 2-process run's log."""
    steps = 4
    single = {m: train(m, tiny(), data(steps)) for m in methods}
    ranks = run_ranks(_dp_worker, 2, tmp_path, methods, steps)
    for m in methods:
        rho, records, weights = ranks[0][m]
        assert rho == ranks[1][m][0]
        for name in weights:
            assert torch.equal(weights[name], ranks[1][m][2][name]), (m, name)
        for mine, theirs in zip(rho, single[m][0], strict=True):
            assert mine == pytest.approx(theirs, rel=1e-9, abs=1e-9), m
        for name, w in replayed(m, records).items():
            assert torch.equal(w, weights[name]), (m, name)


def _failure_worker(rank, world, method):
    """Rank 1's closure raises at step 1 and returns NaN at step 2; every rank must skip both together."""
    from zokern.optim.base import RankFailedError

    model = tiny()
    opt = make(method, model, on_nonfinite="skip")
    records, events = [], []
    opt.record_hook = records.append
    for step, (x, y) in enumerate(data(4)):
        calls = iter(range(10))

        def closure():
            call = next(calls)
            if rank == 1 and step == 1 and call == 0:
                raise KeyError("rank 1's batch is broken")
            if rank == 1 and step == 2:
                return torch.tensor(math.nan), 3
            return share_loss(model, x, y)

        try:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                opt.step(closure)
            events.append("stepped")
        except RankFailedError:
            events.append("other rank failed")
        except KeyError:
            events.append("own failure")
    return events, records, opt.nonfinite_steps, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["mezo", "hizoo"])
def test_a_failing_rank_makes_every_rank_skip(tmp_path, method):
    """HiZOO's first forward is at the unperturbed weights: a failure there must still reach the all-reduce."""
    (events0, log0, nonfinite0, w0), (events1, log1, nonfinite1, w1) = run_ranks(_failure_worker, 2, tmp_path, method)
    assert events0 == ["stepped", "other rank failed", "stepped", "stepped"]
    assert events1 == ["stepped", "own failure", "stepped", "stepped"]
    assert nonfinite0 == nonfinite1 == 1
    for log in (log0, log1):
        assert [bool(r.get("skipped")) for r in log] == [False, True, True, False]
        assert "failed" in log[1] and "failed" not in log[2]
    assert [r.get("grad") for r in log0] == [r.get("grad") for r in log1]
    # Skipped together: the same weights on both ranks, those of the log replayed (the skips restore alike).
    for name, w in replayed(method, log0).items():
        assert torch.equal(w, w0[name]) and torch.equal(w, w1[name]), name


def _ddp_worker(rank, world):
    model = torch.nn.parallel.DistributedDataParallel(tiny())
    rho, _, weights = train("mezo", model.module, data(2), rank, world)
    # The wrapper's own forward (buffer broadcast, no gradient hooks under no_grad) runs as well.
    x, y = data(1)[0]
    with torch.no_grad():
        model(x)
    return rho, weights


def test_ddp_wrapped_model_trains(tmp_path):
    (rho0, w0), (rho1, w1) = run_ranks(_ddp_worker, 2, tmp_path)
    assert rho0 == rho1
    assert all(torch.equal(w0[n], w1[n]) for n in w0)


def _mismatch_worker(rank, world):
    from zokern.distributed import DistributedError

    model = tiny()
    try:
        METHODS["mezo"](model.named_parameters(), lr=1e-2, seed=rank)
    except DistributedError as exc:
        return str(exc)
    return None


def test_ranks_with_different_optimizers_are_refused(tmp_path):
    messages = run_ranks(_mismatch_worker, 2, tmp_path)
    assert all(m and "differs between ranks" in m and "seed" in m for m in messages)


def _world_size_worker(rank, world, state):
    model = tiny()
    opt = make("mezo", model)
    try:
        opt.load_state_dict(state)
    except ValueError as exc:
        return str(exc)
    return None


def test_resume_on_another_world_size_is_refused(tmp_path):
    state = make("mezo", tiny()).state_dict()
    messages = run_ranks(_world_size_worker, 2, tmp_path, state)
    assert all(m and "saved by a run on 1 ranks" in m for m in messages)


# --- entry points -----------------------------------------------------------------------------------------


def _trainer_worker(rank, world, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from test_hf_trainer import trainer

    t = trainer(out, method="mezo", max_steps=3, eval_strategy="no")
    assert t.args.world_size == world
    records = []
    t.create_optimizer()
    t.zo_optimizer.record_hook = records.append
    t.train()
    return [r["grad"] for r in records], {n: p.detach().clone() for n, p in t.model.named_parameters()}


def test_zotrainer_trains_data_parallel(tmp_path):
    """ZOTrainer under 2 processes: each evaluates its own batches, both apply the same updates."""
    (rho0, w0), (rho1, w1) = run_ranks(_trainer_worker, 2, tmp_path, str(tmp_path / "out"))
    assert rho0 == rho1 and len(rho0) == 3
    assert all(torch.equal(w0[n], w1[n]) for n in w0)


def _torchrun(nproc: int, *args: str, timeout: int = TIMEOUT_S):
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "zokern", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_finetune_writes_from_rank_0_and_replays(tiny_model_dir, tmp_path):
    """`torchrun -m zokern finetune` on 2 processes: one set of files (metrics, seed log, checkpoints) from rank
    0; the seed log replays to the checkpoint's weights bitwise on one process; a resume on another world size
    is refused before the model loads."""
    from safetensors.torch import load_file

    from zokern.finetune.replay import replay_run

    out = tmp_path / "run"
    settings = ["finetune", "--model", str(tiny_model_dir), "--steps", "4", "--batch-size", "5", "--eval-every",
                "2", "--eval-examples", "8", "--checkpoint-every", "2", "--lr", "1e-3", "--lr-schedule", "constant",
                "--dtype", "float32", "--lora-rank", "0", "--output-dir", str(out)]
    done = _torchrun(2, *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("zero-shot test accuracy") == 1  # rank 0 reports for all
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    replay_run(str(out / "seedlog.jsonl"), output=str(tmp_path / "replayed.safetensors"), stream=open(os.devnull, "w"))
    trained = load_file(str(out / "checkpoint" / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "replayed.safetensors"))
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[k], rebuilt[k]) for k in trained)

    from zokern.cli import main

    assert main([*settings[:-2], "--output-dir", str(out), "--steps", "6", "--resume"]) == 2


@pytest.mark.parametrize("lora", [True, False], ids=["lora-probes", "full-in-place"])
def test_torchrun_finetune_fsdp_replays_and_resumes(tiny_model_dir, tmp_path, lora):
    """`torchrun -m zokern finetune --fsdp` on 2 processes, LoRA adapters in probe mode or all weights in place: one
    set of files from rank 0; the checkpoint's model.safetensors holds the whole trained tensors, which `zokern
    replay` of the seed log rebuilds bitwise on one process. LoRA: the run cut back to its step-2 checkpoint and
    resumed from its shards ends bitwise where it did, with the same log records. All weights: a resume on 3
    processes is refused. --fsdp on one process, and a resume without --fsdp, are refused with exit code 2."""
    import shutil

    from safetensors.torch import load_file

    from zokern import seedlog
    from zokern.cli import main

    def settings(out, steps):
        mode = ["--probe-mode", "module"] if lora else ["--lora-rank", "0"]
        return ["finetune", "--model", str(tiny_model_dir), "--steps", str(steps), "--batch-size", "5",
                "--eval-every", "2", "--eval-examples", "8", "--checkpoint-every", "2", "--lr", "1e-3",
                "--lr-schedule", "constant", "--dtype", "float32", "--fsdp",
                *mode, "--output-dir", str(out)]

    def run(out, *extra):
        done = _torchrun(2, *settings(out, 4), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("zero-shot test accuracy") == 1  # rank 0 reports for all
        return load_file(str(out / "checkpoint" / "model.safetensors"))

    out = tmp_path / "run"
    trained = run(out)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    replayed = tmp_path / "replayed.safetensors"
    assert main(["replay", "--log", str(out / "seedlog.jsonl"), "--output", str(replayed)]) == 0
    rebuilt = load_file(str(replayed))
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    if lora:
        resumed = tmp_path / "resumed"  # as if stopped after step 2's checkpoint
        shutil.copytree(out, resumed, symlinks=True)
        shutil.rmtree(resumed / "checkpoint-4")
        again = run(resumed, "--resume")
        assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
        assert seedlog.read(out / "seedlog.jsonl")[1] == seedlog.read(resumed / "seedlog.jsonl")[1]
    else:
        done = _torchrun(3, *settings(out, 6), "--resume")
        assert done.returncode != 0 and "trained on 2 processes; resume it on 2 (this is 3)" in done.stderr
    assert main(settings(tmp_path / "alone", 2)) == 2
    assert main([a for a in settings(out, 6) if a != "--fsdp"] + ["--resume"]) == 2


# --- sharded parameters (FSDP2) -----------------------------------------------------------------------------


class TinyModules(Tiny):
    """Tiny evaluated through its submodules' calls, which FSDP2's hooks all-gather."""

    def forward(self, x):
        return self.out(torch.tanh(self.v_proj(torch.tanh(self.k_proj(x.to(self.k_proj.weight.dtype)))))).double()


def sharded_tiny(dtype):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyModules(dtype)
    for layer in (model.k_proj, model.v_proj, model.out):
        fully_shard(layer)
    fully_shard(model)
    # The root keeps its parameters gathered after a forward unless told otherwise, and would not see the
    # optimizer's writes to its shards (docs/DISTRIBUTED.md).
    model.set_reshard_after_forward(True)
    return model


SHARDED_RUNS = [(m, dtype, two_pass) for m in OPTIONS for dtype in (torch.float32, torch.bfloat16)
                for two_pass in ((False, True) if m in ("mezo", "sparse-mezo") else (False,))]


def method_state(opt):
    """The bucket's trained tensors and method buffers, as this rank holds them (a shard, or the whole)."""
    from zokern.ops import unpack_mask

    b = opt.buckets[0]
    state = {"params": [p.detach().clone() for p in b.params]}
    if "hessians" in b.extra:
        state["hessians"] = [h.clone() for h in b.extra["hessians"]]
    if "anchors" in b.extra:
        state["anchors"] = [a.clone() for a in b.extra["anchors"]]
    if "masks" in b.extra:
        state["masks"] = [unpack_mask(m, b.params[i]).clone() for m, i in zip(b.extra["masks"], b.extra["masked"])]
        state["thresholds"] = b.extra["thresholds"].clone()
    return state


def assert_shards_make_whole(ranks, key, whole):
    """Each rank's method state of run `key` (ranks[r][key][1]), its shards put together, is bitwise `whole`, the
    single-process state; the thresholds, one per tensor, are whole on every rank."""
    for buffer, tensors in whole.items():
        if buffer == "thresholds":
            assert all(torch.equal(r[key][1][buffer], tensors) for r in ranks), key
            continue
        for i, expected in enumerate(tensors):
            pieces = [r[key][1][buffer][i].reshape(-1) for r in ranks]
            assert torch.equal(torch.cat(pieces), expected.reshape(-1)), (key, buffer, i)


def _sharded_worker(rank, world, runs, steps):
    from zokern import distributed

    out = {}
    for method, dtype, two_pass in runs:
        model = sharded_tiny(dtype)
        extra = {"two_pass": True} if two_pass else {}
        opt = make(method, model, **extra)
        records = []
        opt.record_hook = records.append
        for x, y in data(steps):
            rows = distributed.share(list(range(len(x))), world, rank)

            def closure(x=x[rows], y=y[rows]):
                return (model(x) - y).double().square().sum(1).sum() / len(x), len(x)

            opt.step(closure, lambda: closure)
        opt.restore_weights()
        norms = None
        if method == "dizo":
            b = opt.buckets[0]
            idx = b.extra["projected"]
            norms = distributed.distance_norms([b.params[i] for i in idx], b.extra["anchors"],
                                               [b.shards[i] for i in idx], None)
        out[(method, str(dtype), two_pass)] = (records, method_state(opt), norms)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_matches_one_process(tmp_path, world):
    """FSDP2 on 2 and 3 processes (uneven shards, and empty ones: the output layer has one row): the shards put
    together are bitwise the single-process replay of the run's seed log, weights and HiZOO's D, Sparse MeZO's
    masks and thresholds (taken from the shards at the first step and every second one), DiZO's anchors, for
    float32 and bfloat16 weights, with and without two-pass mode; DiZO's sharded distances equal the
    unsharded ones up to float32 accumulation."""
    from zokern.ops import distance_norms

    steps = 4
    ranks = run_ranks(_sharded_worker, world, tmp_path, SHARDED_RUNS, steps)
    for method, dtype, two_pass in SHARDED_RUNS:
        key = (method, str(dtype), two_pass)
        records = ranks[0][key][0]
        assert all(r[key][0] == records for r in ranks), key  # every rank logged the same steps
        model = tiny(dtype)
        opt = make(method, model, process_group=False, **({"two_pass": True} if two_pass else {}))
        for record in records:
            opt.replay_step(record)
        opt.restore_weights()
        assert_shards_make_whole(ranks, key, method_state(opt))
        if method == "dizo":
            b = opt.buckets[0]
            expected = distance_norms([b.params[i] for i in b.extra["projected"]], b.extra["anchors"])
            for r in ranks:
                torch.testing.assert_close(r[key][2], expected, rtol=1e-6, atol=0)


def _resume_worker(rank, world, method, checkpoint):
    from zokern import distributed

    batches = data(4)

    def run(model, opt, part):
        for x, y in part:
            rows = distributed.share(list(range(len(x))), world, rank)

            def closure(x=x[rows], y=y[rows]):
                return (model(x) - y).double().square().sum(1).sum() / len(x), len(x)

            opt.step(closure, lambda: closure)

    model = sharded_tiny(torch.float32)
    opt = make(method, model)
    run(model, opt, batches[:2])
    distributed.save_checkpoint(checkpoint, model, opt)
    run(model, opt, batches[2:])
    straight = method_state(opt)
    # A new process's objects: built from scratch (other initial weights), then loaded.
    torch.manual_seed(1)
    model = sharded_tiny(torch.float32)
    opt = make(method, model)
    distributed.load_checkpoint(checkpoint, model, opt)
    run(model, opt, batches[2:])
    return straight, method_state(opt)


@pytest.mark.parametrize("method", ["hizoo", "sparse-mezo"])
def test_sharded_checkpoint_resumes_bitwise(tmp_path, method):
    """Saved through torch.distributed.checkpoint after 2 of 4 steps, loaded into freshly built objects: the
    last 2 steps end bitwise where the uninterrupted run does, weights and method buffers."""
    for straight, resumed in run_ranks(_resume_worker, 2, tmp_path, method, str(tmp_path / "checkpoint")):
        for buffer, tensors in straight.items():
            for a, b in zip(tensors if isinstance(tensors, list) else [tensors],
                            resumed[buffer] if isinstance(tensors, list) else [resumed[buffer]], strict=True):
                assert torch.equal(a, b), buffer


def _unsupported_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from zokern.distributed import DistributedError

    mesh = init_device_mesh("cpu", (world,))
    messages = []
    column = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))  # tensor parallel's split
    row = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(0)]))
    for params, options in (([("w", column)], {}), ([("w", row)], {"process_group": False})):
        try:
            METHODS["mezo"](params, lr=1e-3, **options)
            messages.append(None)
        except DistributedError as exc:
            messages.append(str(exc))
    return messages


def test_unsupported_sharding_is_refused(tmp_path):
    """Sharding on dim 1 (tensor parallel) and sharded parameters without the loss reduction: clear errors."""
    for tensor_parallel, alone in run_ranks(_unsupported_worker, 2, tmp_path):
        assert tensor_parallel and "tensor parallel" in tensor_parallel and "Shard(dim=1)" in tensor_parallel
        assert alone and "process_group" in alone


def _save_worker(rank, world, checkpoint):
    from zokern import distributed

    model = sharded_tiny(torch.float32)
    distributed.save_checkpoint(checkpoint, model, make("hizoo", model))


def _load_worker(rank, world, checkpoint):
    from zokern import distributed

    model = sharded_tiny(torch.float32)
    try:
        distributed.load_checkpoint(checkpoint, model, make("hizoo", model))
    except distributed.DistributedError as exc:
        return str(exc)
    return None


def test_sharded_checkpoint_on_another_world_size_is_refused(tmp_path):
    """Saved on 2 ranks, loaded on 3: every rank refuses before loading anything (no collective, no hang)."""
    checkpoint = str(tmp_path / "checkpoint")
    run_ranks(_save_worker, 2, tmp_path, checkpoint)
    messages = run_ranks(_load_worker, 3, tmp_path, checkpoint)
    assert all(m and "resume on the world size it was saved on" in m for m in messages)


@pytest.mark.parametrize("bad", [((1.0, 2), 3), (1.0, -1), (1.0, float("inf")), (1.0, True), (1.0, "4")])
def test_closure_share_counts_are_checked(bad):
    """A closure's (loss, count): the count is a finite number >= 0; anything else is refused, naming it,
    and as any failed forward leaves the weights as a skipped step does."""
    model = tiny()
    opt = make("mezo", model)
    with pytest.raises((TypeError, ValueError), match="closure returned"):
        opt.step(lambda: bad)
    assert opt.step_count == 1  # the step ran as a skipped one (the first forward had moved the weights)


def test_a_share_count_alone_changes_nothing():
    """On one process (loss, count) is the loss: the same ρ as a bare loss, bitwise."""
    rhos = []
    for wrap in (lambda loss: loss, lambda loss: (loss, 3)):
        model = tiny()
        opt = make("mezo", model)
        records = []
        opt.record_hook = records.append
        for x, y in data(2):
            opt.step(lambda: wrap(share_loss(model, x, y)[0]))
        rhos.append([r["grad"] for r in records])
    assert rhos[0] == rhos[1]


# --- probe mode on sharded parameters (FSDP2) ----------------------------------------------------------------


PROBE_RUNS = [(m, dtype) for m in OPTIONS for dtype in (torch.float32, torch.bfloat16)]
LAYERS = ("k_proj", "v_proj", "out")


def _sharded_probe_worker(rank, world, runs, steps):
    """Probe mode on an FSDP2 model: per run, the seed log, this rank's shards and buffers, and (rank 0) the
    gathered weights every forward computed with. Inside each forward the stored shards must be those of the
    step's start: probes never write them."""
    from zokern import distributed

    out = {}
    for method, dtype in runs:
        model = sharded_tiny(dtype)
        opt = make(method, model).attach(model)
        records, seen = [], []
        opt.record_hook = records.append
        for layer in LAYERS:  # after FSDP's pre-forward: the module holds the gathered weight
            getattr(model, layer).register_forward_pre_hook(
                lambda module, args: seen.append((module.weight.detach().clone(), module.bias.detach().clone())))
        for x, y in data(steps):
            rows = distributed.share(list(range(len(x))), world, rank)
            stored = [p.clone() for b in opt.buckets for p in b.params]
            calls = iter(range(100))

            def closure(x=x[rows], y=y[rows], stored=stored, calls=calls):
                if next(calls) < opt.forwards_per_step:  # the step's own forwards, before its update
                    assert all(torch.equal(p, s) for p, s in zip((p for b in opt.buckets for p in b.params), stored))
                return (model(x) - y).double().square().sum(1).sum() / len(x), len(x)

            opt.step(closure, lambda: closure)
        out[(method, str(dtype))] = (records, method_state(opt), seen if rank == 0 else None)
    return out


def expected_forwards(method, dtype, records):
    """The weights each forward of the logged steps must see, per layer, from a single process: before step k
    (a replay of k records), the unperturbed weights for HiZOO's centre forward, then the method's own probe
    copies θ ± εP of the whole tensors (Sparse MeZO's masks taken first), then DiZO's search probes are skipped."""
    forwards = []
    for k, record in enumerate(records):
        model = tiny(dtype)
        opt = make(method, model, process_group=False)
        for r in records[:k]:
            opt.replay_step(r)
        b = opt.buckets[0]
        index = {name: i for i, name in enumerate(b.names)}
        layers = [(getattr(model, layer), f"{layer}.weight", f"{layer}.bias") for layer in LAYERS]
        if opt.forwards_per_step == 3:
            forwards += [(m.weight.detach().clone(), m.bias.detach().clone()) for m, _, _ in layers]
        opt._begin_probes(record["seed"])
        for scale in (opt.eps, -opt.eps):
            forwards += [tuple(opt._probe(b, index[n], record["seed"], scale, None) for n in (w, bias))
                         for _, w, bias in layers]
        if method == "dizo" and (k + 1) % opt.project_every == 0:
            forwards += [None] * (2 * opt.project_iters * len(LAYERS))  # the search's forwards: not compared here
    return forwards


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_probe_mode_matches_one_process(tmp_path, world):
    """Probe mode on FSDP2 shards, 2 and 3 processes (uneven shards; the output layer's one row leaves the other
    ranks empty), every method, float32 and bfloat16: every forward computes with bitwise the single-process probe
    copies of the whole tensors (HiZOO's centre forward with the stored weights), the stored shards are not written
    during the step's forwards, and after the steps the shards put together are bitwise the single-process replay
    of the seed log: weights, HiZOO's D, Sparse MeZO's masks and thresholds, DiZO's anchors."""
    steps = 3
    ranks = run_ranks(_sharded_probe_worker, world, tmp_path, PROBE_RUNS, steps)
    for method, dtype in PROBE_RUNS:
        key = (method, str(dtype))
        records, _, seen = ranks[0][key]
        assert all(r[key][0] == records for r in ranks), key
        assert all(r.get("probed") and not r.get("skipped") for r in records), key
        expected = expected_forwards(method, dtype, records)
        assert len(seen) == len(expected), key
        for n, (got, want) in enumerate(zip(seen, expected)):
            if want is not None:
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (key, n)
        model = tiny(dtype)
        opt = make(method, model, process_group=False)
        for record in records:
            opt.replay_step(record)
        assert_shards_make_whole(ranks, key, method_state(opt))


def _sharded_probe_lr0_worker(rank, world):
    """bfloat16 shards, lr = 0, every method in probe mode: the update writes each shard back bitwise."""
    from zokern import distributed

    out = {}
    for method in OPTIONS:
        model = sharded_tiny(torch.bfloat16)
        opt = make(method, model).attach(model)
        for group in opt.param_groups:
            group["lr"] = 0.0
        before = [p.clone() for b in opt.buckets for p in b.params]
        for x, y in data(3):
            rows = distributed.share(list(range(len(x))), world, rank)

            def closure(x=x[rows], y=y[rows]):
                return (model(x) - y).double().square().sum(1).sum() / len(x), len(x)

            opt.step(closure, lambda: closure)
        out[method] = all(torch.equal(p, q) for p, q in zip((p for b in opt.buckets for p in b.params), before))
    return out


def test_sharded_probe_mode_lr_0_leaves_bfloat16_shards_unchanged(tmp_path):
    for result in run_ranks(_sharded_probe_lr0_worker, 2, tmp_path):
        assert result == {m: True for m in OPTIONS}


def _sharded_probe_failure_worker(rank, world, method):
    """Step 1: rank 1's closure raises after its forward. Step 2: every rank's forward raises inside v_proj, with
    k_proj's probe gathered and v_proj's being gathered. Steps 0 and 3 train."""
    from torch.distributed.tensor import DTensor

    from zokern import distributed
    from zokern.optim.base import RankFailedError

    model = sharded_tiny(torch.float32)
    opt = make(method, model).attach(model)
    records, events, unchanged = [], [], []
    opt.record_hook = records.append

    def broken_layer(module, args):
        raise RuntimeError("v_proj is broken")

    for step, (x, y) in enumerate(data(4)):
        rows = distributed.share(list(range(len(x))), world, rank)
        before = [p.clone() for b in opt.buckets for p in b.params]

        def closure(x=x[rows], y=y[rows]):
            loss = (model(x) - y).double().square().sum(1).sum() / len(x)
            if rank == 1 and step == 1:
                raise KeyError("rank 1's labels are broken")
            return loss, len(x)

        handle = model.v_proj.register_forward_pre_hook(broken_layer) if step == 2 else None
        try:
            opt.step(closure)
            events.append("stepped")
        except RankFailedError:
            events.append("other rank failed")
        except (KeyError, RuntimeError) as exc:
            events.append(type(exc).__name__)
        if handle is not None:
            handle.remove()
        if step in (1, 2):
            unchanged.append(all(torch.equal(p, q) for p, q in zip((p for b in opt.buckets for p in b.params), before)))
            # FSDP resharded: no module holds a gathered probe for a later forward to compute with.
            unchanged.append(all(isinstance(getattr(model, layer).weight, DTensor) for layer in LAYERS))
    return events, unchanged, records, method_state(opt)


@pytest.mark.parametrize("method", ["mezo", "hizoo"])
def test_sharded_probe_mode_failure_leaves_shards_unchanged(tmp_path, method):
    """A closure that raises on one rank, and a forward that raises inside a sharded layer on every rank: every
    rank skips the step, no rank hangs, the shards are bitwise unchanged, FSDP holds no gathered probe afterwards,
    and the run goes on to the single-process replay's weights."""
    ranks = run_ranks(_sharded_probe_failure_worker, 2, tmp_path, method)
    assert ranks[0][0] == ["stepped", "other rank failed", "RuntimeError", "stepped"]
    assert ranks[1][0] == ["stepped", "KeyError", "RuntimeError", "stepped"]
    records = ranks[0][2]
    assert [bool(r.get("skipped")) for r in records] == [False, True, True, False]
    model = tiny()
    opt = make(method, model, process_group=False)
    for record in records:
        opt.replay_step(record)
    whole = method_state(opt)
    for events, unchanged, _, state in ranks:
        assert all(unchanged), unchanged
    for i, tensor in enumerate(whole["params"]):
        assert torch.equal(torch.cat([r[3]["params"][i].reshape(-1) for r in ranks]), tensor.reshape(-1)), i


def _probe_unsupported_worker(rank, world):
    from torch.distributed.fsdp import fully_shard

    from zokern.distributed import DistributedError

    messages = []
    model = sharded_tiny(torch.float32)
    try:
        METHODS["subzero"](model, lr=1e-3, rank=2, side_path=True)
        messages.append(None)
    except DistributedError as exc:
        messages.append(str(exc))
    torch.manual_seed(0)
    model = TinyModules()
    fully_shard(model.k_proj)
    fully_shard(model)  # the root, holding v_proj and out, keeps its parameters gathered after a forward
    opt = METHODS["mezo"](model.named_parameters(), lr=1e-3)
    try:
        opt.attach(model)
        messages.append(None)
    except DistributedError as exc:
        messages.append(str(exc))
    return messages


def test_sharded_probe_mode_refusals(tmp_path):
    """What probe mode does not take on shards, refused at construction or attach: SubZero's side path, and a root
    that keeps its parameters gathered after its forward."""
    for side_path, root in run_ranks(_probe_unsupported_worker, 2, tmp_path):
        assert side_path and "side path" in side_path and "sharded" in side_path
        assert root and "set_reshard_after_forward(True)" in root
