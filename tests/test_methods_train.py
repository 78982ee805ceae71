"""Every method trains out of the box: a short run on LoRA adapters (the CLI's default setup) of a tiny
random Llama changes the adapters and lowers the loss; Sparse MeZO keeps masking entries of adapters that
start at zero, DiZO projects every LoRA tensor; options that select nothing are refused or warned about."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from zokern import ops, optim  # noqa: E402

VOCAB = 40


def tiny_llama(lora: bool = True):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
    return model.eval()


def batch(seed: int, size: int = 16, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (size, 1), generator=g) + torch.arange(length)) % VOCAB  # next = this + 1


def loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def trained(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


OPTIONS = {"subzero": dict(rank=2), "dizo": dict(project_every=10, project_iters=2)}
# MeZO's LoRA and full-weight settings, scaled for a short run; Sparse MeZO moves a fifth of the entries per
# step and takes a larger rate for the same progress.
RATES = {True: dict(lr=0.1, eps=1e-2), False: dict(lr=3e-3, eps=1e-3)}
SPARSE_RATES = {True: 0.5, False: 3e-2}


def train(model, method, steps, lora=True, **options):
    settings = {**RATES[lora], "seed": 0, **OPTIONS.get(method, {}), **options}
    if method == "sparse-mezo":
        settings["lr"] = SPARSE_RATES[lora]
    opt = optim.METHODS[method](trained(model), **settings)
    tokens, fresh = batch(0), iter(range(1, 10**6))
    fresh_closure = lambda: (lambda b: lambda: loss(model, b))(batch(next(fresh)))  # noqa: E731
    for _ in range(steps):
        opt.step(lambda: loss(model, tokens), fresh_closure)
    return opt


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "all-weights"])
@pytest.mark.parametrize("method", list(optim.METHODS))
def test_short_run_changes_the_trained_tensors_and_lowers_the_loss(method, lora):
    model = tiny_llama(lora)
    named = trained(model)
    if lora:
        assert named and all(".lora_" in n for n, _ in named)
    start = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        before = float(loss(model, batch(0)))
    train(model, method, 60, lora)
    with torch.no_grad():
        after = float(loss(model, batch(0)))
    assert after < before - 0.01, (before, after)
    for name, p in named:
        assert not torch.equal(p, start[name]), name  # LoRA: A and B both move (B starts at zero)


@pytest.mark.parametrize("zero_start", ["dense", "tracked"])
def test_sparse_mezo_moves_lora_b(zero_start):
    """B starts at zero: its threshold is 0 at the first step. zero_start="dense" (the default) moves all of B at
    every step; "tracked" re-estimates its threshold every step, so the smallest 20% of B keep moving. A
    threshold of 0 kept would freeze B after its first update. A, with its random start, is masked either way."""
    model = tiny_llama()
    opt = train(model, "sparse-mezo", 1, zero_start=zero_start)
    after_first = {n: p.detach().clone() for n, p in trained(model) if "lora_B" in n}
    tokens = batch(0)
    for _ in range(5):
        opt.step(lambda: loss(model, tokens))
    (bucket,) = opt.buckets
    for i, mask in zip(bucket.extra["masked"], bucket.extra["masks"]):
        name, p = bucket.names[i], bucket.params[i]
        share = ops.unpack_mask(mask, p).float().mean().item()
        if "lora_B" in name:
            assert share == 1.0 if zero_start == "dense" else 0.15 < share < 0.3, (name, share)
            assert not torch.equal(p, after_first[name]), name
        else:  # A's threshold is taken once: the share that moves is below 20% as A moves away from it
            assert 0 < share <= 0.3, (name, share)
    assert sorted(bucket.names[bucket.extra["masked"][i]] for i in bucket.extra["tracked"]) == \
        sorted(after_first)


def test_sparse_mezo_refuses_an_unknown_zero_start_rule():
    with pytest.raises(ValueError, match="zero_start must be one of dense, tracked, got 'never'"):
        optim.SparseMeZO([torch.nn.Parameter(torch.zeros(4, 4))], zero_start="never")


def test_sparse_mezo_full_weights_thresholds_stay_fixed():
    """On pre-trained weights no threshold is degenerate: thresholds are taken once, as in the paper."""
    model = tiny_llama(lora=False)
    opt = train(model, "sparse-mezo", 3, lora=False)
    (bucket,) = opt.buckets
    assert bucket.extra["tracked"] == [] and bucket.extra["masked"]


def test_sparse_mezo_warns_when_it_masks_nothing():
    norm = torch.nn.Parameter(torch.ones(8))
    with pytest.warns(UserWarning, match="masks no tensor"):
        optim.SparseMeZO([("norm.weight", norm)], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.SparseMeZO([("norm.weight", norm)], lr=1e-3, mask_vectors=True)


def test_dizo_projects_every_lora_tensor_by_default():
    model = tiny_llama()
    records = []
    opt = optim.DiZO(trained(model), lr=0.1, eps=1e-2, seed=0, project_every=2, project_iters=1)
    opt.record_hook = records.append
    projected = [n for b in opt.buckets for i, n in enumerate(b.names) if i in b.extra["projected"]]
    assert projected == [n for n, _ in trained(model)]  # A and B of q_proj and v_proj
    assert opt.mean_forwards_per_step == 3.0
    tokens = batch(0)
    for _ in range(2):
        opt.step(lambda: loss(model, tokens), fresh_closure=lambda: lambda: loss(model, batch(1)))
    (factors,) = records[1]["rescale"]
    assert len(factors) == len(projected)


def test_dizo_default_on_all_weights_projects_k_and_v():
    model = tiny_llama(lora=False)
    named = [(n, p) for n, p in model.named_parameters() if n != "model.embed_tokens.weight"]
    opt = optim.DiZO(named, lr=1e-3)
    projected = [n for b in opt.buckets for i, n in enumerate(b.names) if i in b.extra["projected"]]
    assert projected == ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]


def test_dizo_refuses_a_pattern_that_matches_nothing():
    model = tiny_llama()
    start = {n: p.detach().clone() for n, p in trained(model)}
    with pytest.raises(ValueError, match=r"project_pattern 'k_proj\\\\.weight\$' matches none of the 4 trained"):
        optim.DiZO(trained(model), project_pattern=r"k_proj\.weight$")
    with pytest.raises(ValueError, match="pass model.named_parameters"):
        optim.DiZO([p for _, p in trained(model)])
    assert all(torch.equal(p, start[n]) for n, p in trained(model))  # untouched


@pytest.mark.parametrize("two_pass", [False, True])
def test_sparse_mezo_on_lora_replays_and_resumes_bitwise(two_pass):
    """B's per-step thresholds come from the weights alone: replay and resume need no new logged quantity."""
    import copy
    import json

    from zokern import seedlog

    def make(model):
        return optim.SparseMeZO(trained(model), lr=0.5, eps=1e-2, seed=0, two_pass=two_pass)

    tokens, records = batch(0), []
    model = tiny_llama()
    opt = make(model)
    opt.record_hook = records.append
    for _ in range(3):
        opt.step(lambda: loss(model, tokens))
    saved_state, saved_weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for _ in range(3):
        opt.step(lambda: loss(model, tokens))
    opt.restore_weights()

    replayed = tiny_llama()
    seedlog.replay(make(replayed), [json.loads(json.dumps(r)) for r in records])
    resumed = tiny_llama()
    resumed.load_state_dict(saved_weights)
    opt = make(resumed)
    opt.load_state_dict(saved_state)
    for _ in range(3):
        opt.step(lambda: loss(resumed, tokens))
    opt.restore_weights()
    for (name, p), (_, q), (_, r) in zip(trained(model), trained(replayed), trained(resumed)):
        assert torch.equal(p, q) and torch.equal(p, r), name


def test_hizoo_curvature_in_float32_as_the_authors():
    losses = {"plus": 2.3456789, "minus": 2.3456701, "center": 2.3456712}
    exact = optim.HiZOO([torch.nn.Parameter(torch.ones(2, 2))], eps=1e-3)._measure(losses)["hess_scale"]
    authors = optim.HiZOO([torch.nn.Parameter(torch.ones(2, 2))], eps=1e-3,
                          curvature_dtype="float32")._measure(losses)["hess_scale"]
    l = {k: torch.tensor(v, dtype=torch.float32) for k, v in losses.items()}
    assert authors == float((l["plus"] + l["minus"] - 2 * l["center"]).abs() / (2 * 1e-3 ** 2))
    assert exact == abs(losses["plus"] + losses["minus"] - 2 * losses["center"]) / (2 * 1e-3 ** 2)
    assert authors != exact
    with pytest.raises(ValueError, match="curvature_dtype must be"):
        optim.HiZOO([torch.nn.Parameter(torch.ones(2))], curvature_dtype="half")
