"""Probe mode (zokern/optim/probe.py): the forwards of a step see θ ± εP through transient per-module copies and
only the update writes the trained tensors. Tiny models with random weights: a tied embedding + linear + norm
model for every backend, a one-layer Llama for the Hugging Face paths."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import available_pairs
from zokern import ops
from zokern.optim import METHODS, MeZO, probe
from zokern.optim.probe import probe_copy, stream_copy
from zokern.random import step_seed

OPTIONS = {"subzero": {"rank": 2, "subspace_every": 10},
           "dizo": {"project_every": 10, "project_iters": 2, "project_pattern": r"(lin|emb)\.weight$"},
           "sparse-mezo": {"mask_vectors": True}}
BACKENDS = [p for p in available_pairs() if p.values[1] == "cpu"]
TABLE_VOCAB = 8  # tiny_table's: a batch looks up most rows, in one or two runs


class TinyLM(nn.Module):
    """Embedding tied to the output layer (one parameter held by two modules), a linear layer and a norm."""

    def __init__(self, vocab=16, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        logits = self.head(self.norm(torch.tanh(self.lin(self.emb(ids)))))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def tiny(dtype=torch.float32, seed=0, vocab=16, width=8):
    torch.manual_seed(seed)
    return TinyLM(vocab, width).to(dtype)


def tiny_table(dtype):
    """The Triton interpreter's model: TinyLM trained only in its tied table, which the probes reach both ways (an
    embedding's rows, the output layer's whole copy). An interpreted kernel program costs 20–50 ms of Python
    whatever its size (one per tensor a launch covers), and a step here runs five or six (one per probe copy, the
    update, SubZero's core draw): 50 steps take 8–15 s of CPU time."""
    model = tiny(dtype, vocab=TABLE_VOCAB, width=4)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "emb.weight")
    return model


def batch(step=0, vocab=16, shape=(3, 6)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1000 + step))


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run(opt, model, steps, start=0):
    vocab = model.emb.num_embeddings
    for step in range(start, start + steps):
        ids = batch(step, vocab)
        opt.step(lambda ids=ids: model(ids),
                 fresh_closure=lambda step=step: (lambda ids=batch(step + 500, vocab): model(ids)))


def make(method, model_or_params, backend, **kw):
    return METHODS[method](model_or_params, backend=backend, **{**OPTIONS.get(method, {}), **kw})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lr0_leaves_every_trained_tensor_bitwise(method, dtype, backend, device):
    """50 steps at lr 0 in 16 bits: the probes never write the weights, and the update (restore 0, lr 0) rewrites
    each element with its own value. The in-place path changes a large share of them (the ± round trip). On the
    Triton interpreter the model trains its tied table only (`tiny_table`); its other kernels' paths are those of
    tests/ops."""
    model = tiny_table(dtype) if backend == "triton" else tiny(dtype)
    start = snapshot(model)
    opt = make(method, model, backend, lr=0.0, eps=1e-2)
    steps = 50
    run(opt, model, steps)
    assert opt.step_count == steps and opt.nonfinite_steps == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]), name
    if backend == "cpp":  # the failure probe mode removes, on the same model
        inplace = tiny(dtype)
        run(make(method, inplace.named_parameters(), backend, lr=0.0, eps=1e-2), inplace, 5)
        assert not torch.equal(inplace.lin.weight, start["lin.weight"])


@pytest.mark.parametrize("method", list(METHODS))
def test_float32_module_path_matches_in_place(method):
    """Same seeds, same z: the two paths differ only by float32 rounding. The in-place ± round trip moves the
    minus probe's weights by an ulp, so the losses by ulps of L and ρ by about ulp(L)/ε (1e-5 relative here);
    the weights then differ by that share of how far they moved."""
    a, b = tiny(), tiny()
    records_a, records_b = [], []
    opt_a = make(method, a, "cpp", lr=1e-2, eps=1e-2)
    opt_b = make(method, b.named_parameters(), "cpp", lr=1e-2, eps=1e-2)
    opt_a.record_hook, opt_b.record_hook = records_a.append, records_b.append
    run(opt_a, a, 12)
    run(opt_b, b, 12)
    assert [r["probed"] for r in records_a] == [True] * 12 and "probed" not in records_b[0]
    for ra, rb in zip(records_a, records_b):
        assert ra["grad"] == pytest.approx(rb["grad"], rel=1e-3, abs=1e-3)
    start = snapshot(tiny())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        moved = (pa - start[name]).abs().max().item()
        assert moved > 1e-2, name
        assert (pa - pb).abs().max().item() <= 1e-4 * moved, name


def test_llama_and_peft_lora_in_probe_mode():
    """A Hugging Face Llama with a tied embedding, full weights and PEFT LoRA adapters: bf16 at lr 0 keeps every
    tensor bitwise; float32 matches the in-place path."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def llama(dtype):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config).to(dtype).eval()

    def lora(dtype):
        return peft.get_peft_model(llama(dtype), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    def steps(opt, model, n):
        for step in range(n):
            ids = batch(step, vocab=64)
            opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)

    for build in (llama, lora):
        model = build(torch.bfloat16)
        start = snapshot(model)
        steps(MeZO(model, lr=0.0, eps=1e-2), model, 10)
        assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
        a, b = build(torch.float32), build(torch.float32)
        steps(MeZO(a, lr=1e-2, eps=1e-2), a, 5)
        steps(MeZO([(n, p) for n, p in b.named_parameters() if p.requires_grad], lr=1e-2, eps=1e-2), b, 5)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5, msg=name)


def test_tied_embedding_sees_the_same_probe_in_both_modules():
    """The embedding computes with the looked-up rows of the probe the output layer uses in full."""
    model = tiny()
    seen = {}
    # Registered after probe mode's hooks: the pre-hook sees the swapped weight, the forward hook the output.
    opt = MeZO(model, lr=0.0, eps=1e-2, backend="reference")
    model.head.register_forward_pre_hook(lambda m, args: seen.setdefault("head", m.weight.clone()))
    model.emb.register_forward_hook(lambda m, args, out: seen.setdefault("emb", out.clone()))
    ids = batch()
    opt.step(lambda: model(ids))
    full = model.emb.weight.detach().clone()
    ops.perturb_([full], step_seed(opt.seed, 0), 1e-2, stream_ids=opt.buckets[0].stream_ids[:1], backend="reference")
    assert torch.equal(seen["head"], full)
    assert torch.equal(seen["emb"], full[ids])
    assert isinstance(model.head.weight, nn.Parameter) and model.head.weight is model.emb.weight


# SPAN_GAP_ELEMENTS for the tests' 6-wide table: exact runs of rows; runs with up to 2 rows between them merged;
# one span; the device's own setting.
SPAN_GAPS = {"runs": 0, "near-runs-merged": 12, "one-span": 1 << 30, "device-default": None}


@pytest.mark.parametrize("gap", SPAN_GAPS)
@pytest.mark.parametrize("backend,device", available_pairs())
def test_embedding_rows_draw_the_full_tensors_z(backend, device, gap, monkeypatch):
    """Spans of rows (runs, or runs merged with the rows between them), one perturb_ call over them at their element
    offsets: bitwise the full op's rows."""
    if SPAN_GAPS[gap] is not None:
        monkeypatch.setitem(probe.SPAN_GAP_ELEMENTS, device, SPAN_GAPS[gap])
    p = torch.randn(40, 6, device=device)
    full = p.clone()
    ops.perturb_([full], 123, 0.5, stream_ids=[9], backend=backend)
    for rows in ([0, 1, 2, 7, 20, 21, 39], [0, 2, 4, 5, 9, 38], [17], [0, 39], list(range(40))):
        rows = torch.tensor(rows, device=device)
        got = stream_copy(p, 123, 9, 0.5, rows, dist=0, backend=backend)
        assert torch.equal(got, full[rows]), rows
    assert stream_copy(p, 123, 9, 0.5, rows[:0], dist=0, backend=backend).shape == (0, 6)


# (first row, rows) of each piece for rows 0, 3, 7, 8, 12 of a 6-wide table.
RUNS, NEAR_RUNS_MERGED, ONE_SPAN = [(0, 1), (3, 1), (7, 2), (12, 1)], [(0, 4), (7, 2), (12, 1)], [(0, 13)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
@pytest.mark.parametrize("gap,pieces", [(0, RUNS), (12, NEAR_RUNS_MERGED), (17, NEAR_RUNS_MERGED), (18, ONE_SPAN),
                                        (None, None)])
def test_embedding_rows_are_perturbed_in_spans(device, gap, pieces, monkeypatch):
    """The pieces of the perturb call: runs of rows merged where at most SPAN_GAP_ELEMENTS elements lie between them
    (6-wide rows: 2 rows at 12 and 17, 3 at 18), at offset first row × 6; by default exact runs on the CPU, one span
    on a GPU; the looked-up rows are those of the perturbed copy."""
    if gap is None:
        pieces = RUNS if device == "cpu" else ONE_SPAN
    else:
        monkeypatch.setitem(probe.SPAN_GAP_ELEMENTS, device, gap)
    p = torch.randn(20, 6, device=device)
    rows = torch.tensor([0, 3, 7, 8, 12], device=device)
    seen = []

    def perturb(copies, offsets):
        seen.extend((offset // 6, len(copy)) for copy, offset in zip(copies, offsets))
        for copy, offset in zip(copies, offsets):
            assert torch.equal(copy, p[offset // 6:offset // 6 + len(copy)])
            copy.add_(torch.arange(offset, offset + copy.numel(), device=device).view_as(copy))

    got = probe_copy(p, rows, perturb)
    assert seen == pieces
    assert torch.equal(got, p[rows] + torch.arange(120, device=device).view(20, 6)[rows])


@pytest.mark.parametrize("method", ["mezo", "hizoo", "dizo"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failing_closure_leaves_the_stored_weights_and_the_step(method, fail_at):
    """An exception in any forward of the step (HiZOO's third, or DiZO's search) is raised; the stored tensors are
    bitwise as they were and back in their modules, the step did not happen, and running it again works."""
    model = tiny(torch.bfloat16)
    opt = make(method, model, "cpp", lr=1e-2, eps=1e-2, **({"project_every": 1} if method == "dizo" else {}))
    run(opt, model, 1)
    before, count = snapshot(model), opt.step_count
    calls = []
    parameters = {name: p for name, p in model.named_parameters()}

    def closure():
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return model(batch())

    if method == "dizo":  # the search's closure fails; its step's update has landed
        with pytest.raises(RuntimeError, match="boom"):
            opt.step(lambda: model(batch()), fresh_closure=lambda: closure)
        assert opt.step_count == count + 1
        return
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert opt.step_count == count
    for name, p in model.named_parameters():
        assert p is parameters[name] and isinstance(p, nn.Parameter)
        assert torch.equal(p, before[name]), name
    run(opt, model, 1, start=1)
    assert opt.step_count == count + 1


def test_dizo_search_failure_in_probe_mode_leaves_the_projected_tensors():
    model = tiny(torch.bfloat16)
    opt = make("dizo", model, "cpp", lr=1e-2, eps=1e-2, project_every=2)
    run(opt, model, 1)
    ids = batch(1)
    opt.step(lambda: model(ids))  # step 2 projects with fresh batches from the step's closure (a warning)
    projected = snapshot(model)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("search")
        return model(ids)

    run(opt, model, 1, start=2)
    projected = snapshot(model)
    with pytest.raises(RuntimeError, match="search"):
        opt.step(lambda: model(ids), fresh_closure=lambda: failing)
    # The MeZO update of the step landed; the projected tensors kept it and nothing of the search.
    assert opt.step_count == 4
    assert isinstance(model.lin.weight, nn.Parameter) and not torch.equal(model.lin.weight, projected["lin.weight"])


def test_bad_input_is_refused_before_any_tensor_is_touched():
    model, other = tiny(), tiny()
    start = snapshot(model)
    opt = MeZO(model.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="not parameters of the given model"):
        opt.attach(other)
    with pytest.raises(ValueError, match="no two-pass mode"):
        MeZO(model, lr=1e-2, two_pass=True)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.extra = nn.ParameterDict({"scale": nn.Parameter(torch.ones(4))})

        def forward(self, x):
            return (self.lin(x) * self.extra["scale"]).sum()

    with pytest.raises(ValueError, match="ParameterDict 'extra', which has no forward"):
        MeZO(Holder(), lr=1e-2)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x).sum() + (x @ self.unused.weight).sum()  # reads a weight outside its module

    with pytest.raises(IndexError, match="index out of range"):  # a remapped lookup must still reject bad ids
        MeZO(model, lr=1e-2).step(lambda: model(torch.tensor([[1, 16]])))
    unused = Unused()
    before = snapshot(unused)
    opt = MeZO(unused, lr=1e-2)
    with pytest.raises(ValueError, match="'unused.weight' was used by no module"):
        opt.step(lambda: unused(torch.ones(2, 4)))
    assert opt.step_count == 0 and all(torch.equal(p, before[n]) for n, p in unused.named_parameters())
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_replay_of_probe_mode_steps_is_bitwise():
    """The records say the steps were probed: replay runs the update alone, no model attached."""
    for method in METHODS:
        model = tiny(torch.bfloat16)
        records = []
        opt = make(method, model, "cpp", lr=1e-2, eps=1e-2)
        opt.record_hook = records.append
        run(opt, model, 12)
        again = tiny(torch.bfloat16)
        replayer = make(method, again.named_parameters(), "cpp", lr=1e-2, eps=1e-2)
        for record in records:
            replayer.replay_step(record)
        for (name, p), q in zip(model.named_parameters(), again.parameters()):
            assert torch.equal(p, q), (method, name)


def test_peak_memory_of_a_step_is_inference_plus_the_largest_trained_tensor(tmp_path):
    """Peak bytes held by torch's CPU allocator: the profiler records every allocation and free with its size, in
    order (its trace's "[memory]" events); their running sum is what is held beyond the start. A step's peak is at
    most an inference forward's peak plus one trained tensor: one module's copies live at a time."""
    import json

    from torch.profiler import ProfilerActivity, profile

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        prof.export_chrome_trace(str(tmp_path / "trace.json"))
        events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
                  if e.get("name") == "[memory]"]
        held = top = 0
        for e in sorted(events, key=lambda e: e["ts"]):
            held += e["args"]["Bytes"]
            top = max(top, held)
        return top

    torch.manual_seed(0)
    model = TinyLM(vocab=4096, width=64).to(torch.bfloat16)  # the tied table is the largest tensor, 512 KiB
    ids = batch(0, vocab=4096, shape=(2, 16))
    opt = MeZO(model, lr=1e-3, eps=1e-2, backend="cpp")
    opt.step(lambda: model(ids))  # first-call allocations (op caches) out of the measurement
    with torch.no_grad():
        inference = peak(lambda: model(ids))
    step = peak(lambda: opt.step(lambda: model(ids)))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert inference > 0 and step <= inference + largest, (step, inference, largest)
    assert step > inference  # the measurement sees the copies


def test_torch_compile_of_the_model():
    """A compiled model runs in probe mode: the hooks run inside the compiled module's forward (where Dynamo
    cannot trace them, it falls back to eager for those frames); the probes and the lr-0 invariance hold."""
    model = tiny(torch.bfloat16)
    start = snapshot(model)
    compiled = torch.compile(model, backend="eager")
    opt = MeZO(model, lr=0.0, eps=1e-2, backend="cpp")
    plain = tiny(torch.bfloat16)
    reference = MeZO(plain, lr=0.0, eps=1e-2, backend="cpp")
    for step in range(3):
        ids = batch(step)
        assert float(opt.step(lambda: compiled(ids))) == float(reference.step(lambda: plain(ids)))
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())


@pytest.fixture
def sentiment_file(tmp_path):
    lines = [{"text": f"{word} film number {i}", "label": label}
             for i in range(12) for word, label in (("great", "pos"), ("awful", "neg"))]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(__import__("json").dumps(line) for line in lines) + "\n")
    return path


def _cli(tiny_model_dir, task, out, *extra):
    return ["finetune", "--model", str(tiny_model_dir), "--task", str(task), "--template", "Review: {text}\nSentiment:",
            "--labels", "neg=bad,pos=good", "--output-dir", str(out), "--steps", "4", "--batch-size", "4",
            "--eval-examples", "2", "--eval-every", "0", "--checkpoint-every", "0", "--lora-rank", "0", *extra]


@pytest.mark.parametrize("method", list(METHODS))
def test_finetune_bf16_dry_run_saves_the_base_weights(tiny_model_dir, sentiment_file, tmp_path, method):
    """`zokern finetune --lora-rank 0 --dtype bfloat16 --lr 0` is a dry run: probe mode (the default for 16-bit
    weights) saves the base model's weights bit for bit; the seed log says the steps were probed."""
    pytest.importorskip("transformers")
    import json

    from safetensors.torch import load_file

    from zokern.cli import main
    from zokern.finetune.model import load_model

    options = ["--option", "project_every=2", "--option", "project_iters=1"] if method == "dizo" else []
    assert main(_cli(tiny_model_dir, sentiment_file, tmp_path, "--dtype", "bfloat16", "--lr", "0", "--method", method,
                     *options)) == 0
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    base = dict(load_model(str(tiny_model_dir), torch.bfloat16)[0].named_parameters())
    assert saved and all(torch.equal(tensor, base[name]) for name, tensor in saved.items())
    records = [json.loads(line) for line in (tmp_path / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 4 and all(r.get("probed") for r in records)


def test_finetune_probe_mode_settings(tiny_model_dir, sentiment_file, tmp_path, capsys):
    import json

    from zokern.cli import main
    from zokern.finetune.config import FinetuneConfig, uses_probes
    from dataclasses import asdict

    assert not uses_probes(asdict(FinetuneConfig(dtype="float32")))  # float32: the in-place path, as before
    assert uses_probes(asdict(FinetuneConfig()))  # the default, bfloat16: probe mode
    assert uses_probes(asdict(FinetuneConfig(dtype="float16")))
    assert not uses_probes(asdict(FinetuneConfig(dtype="float16", two_pass=True)))
    assert uses_probes(asdict(FinetuneConfig(probe_mode="module")))
    assert not uses_probes({"dtype": "bfloat16", "two_pass": False})  # recorded before probe_mode: in place
    assert main(_cli(tiny_model_dir, sentiment_file, tmp_path / "x", "--probe-mode", "module", "--two-pass")) == 2
    assert "--probe-mode module never leaves the weights perturbed" in capsys.readouterr().err
    out = tmp_path / "f32"
    assert main(_cli(tiny_model_dir, sentiment_file, out, "--steps", "2", "--dtype", "float32")) == 0
    records = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 2 and not any("probed" in r for r in records)


def test_zotrainer_uses_probe_mode_for_16_bit_models(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf_trainer import TokenDataset, make_args, tiny_llama
    from zokern.integration import ZOTrainer

    model = tiny_llama().to(torch.bfloat16)
    start = snapshot(model)
    trainer = ZOTrainer(model=model, args=make_args(tmp_path, learning_rate=0.0), train_dataset=TokenDataset(),
                        eval_dataset=TokenDataset(8, seed=1), zo_method="hizoo")
    trainer.train()
    assert trainer.zo_optimizer.module_probes is not None
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    f32 = ZOTrainer(model=tiny_llama(), args=make_args(tmp_path / "f32", eval_strategy="no"),
                    train_dataset=TokenDataset(), zo_method="mezo")
    f32.create_optimizer()
    assert f32.zo_optimizer.module_probes is None
    with pytest.raises(ValueError, match="no two_pass"):
        ZOTrainer(model=tiny_llama(), args=make_args(tmp_path / "x", eval_strategy="no"), train_dataset=TokenDataset(),
                  zo_options={"two_pass": True}, zo_probes=True)


def test_zokern_replay_rebuilds_a_probe_mode_run_bitwise(tiny_model_dir, sentiment_file, tmp_path):
    """A bf16 run in probe mode, replayed from its seed log without a model attached: the same weights."""
    from safetensors.torch import load_file

    from zokern.cli import main

    assert main(_cli(tiny_model_dir, sentiment_file, tmp_path, "--dtype", "bfloat16", "--lr", "1e-2",
                     "--method", "hizoo")) == 0
    assert main(["replay", "--log", str(tmp_path / "seedlog.jsonl")]) == 0
    trained = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    replayed = load_file(str(tmp_path / "replayed.safetensors"))
    base = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    assert trained.keys() == replayed.keys()
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)
    assert any(not torch.equal(trained[k], base[k].to(torch.bfloat16)) for k in trained if k in base)


IDS = {"scattered": [[0, 3, 9, 15], [7, 12, 5, 1]], "repeated": [[4, 4, 9, 4], [9, 2, 2, 4]],
       "consecutive": [[5, 6, 7, 8], [9, 10, 11, 12]]}


@pytest.mark.parametrize("gap", ["runs", "one-span"])
@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_each_methods_embedding_rows_are_the_rows_of_its_full_probe(backend, method, ids, gap, monkeypatch):
    """The rows an embedding computes with during a probed forward are bitwise those rows of the probe the full
    tensor gets (the same z, mask, Hessian scaling or low-rank factor rows, by the same op), for scattered, repeated
    and consecutive token ids, in 16 bits, where a second rounding would show; perturbed as exact runs of rows or as
    one span over them."""
    monkeypatch.setitem(probe.SPAN_GAP_ELEMENTS, "cpu", SPAN_GAPS[gap])
    model = tiny(torch.bfloat16)
    opt = make(method, model, backend, lr=1e-2, eps=1e-2, **({"alpha": 0.5} if method == "hizoo" else {}))
    run(opt, model, 3)  # a HiZOO D away from ones, Sparse MeZO's thresholds set
    bucket = opt.buckets[0]
    i = next(i for i, p in enumerate(bucket.params) if p is model.emb.weight)
    seen = []

    def capture(module, args, output):  # registered after probe mode's hooks: sees the probed output
        if opt.module_probes.active is not None and not seen:  # the step's first probe, at +ε
            seen.append((output.clone(), opt._probe(bucket, i, step_seed(opt.seed, opt.step_count), opt.eps, None)))

    model.emb.register_forward_hook(capture)
    ids = torch.tensor(IDS[ids])
    opt.step(lambda: model(ids))
    output, full = seen[0]
    assert torch.equal(output, full[ids])
    assert not torch.equal(output, model.emb.weight[ids])
