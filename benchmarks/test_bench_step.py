"""One ZO step end to end on a Llama-architecture model built from a config with random weights (no download):
(a) the MeZO reference step (the authors' eager loop), (b) zokern's step for each method, (c) the forward
passes alone (2, HiZOO 3): the floor no ZO method can beat.

ZOKERN_BENCH_MODEL picks the model (MODELS below; default 1b on CUDA, cpu-small on CPU), ZOKERN_BENCH_BATCH its
batch as <sequences>x<tokens> (default the model's, e.g. 16x32 for smollm2), ZOKERN_BENCH_MODEL_DTYPE its dtype
(float32, bfloat16; default bfloat16 on CUDA, float32 on CPU), ZOKERN_BENCH_ROUNDS the timed rounds (default 5; 3
for 1b and 8b). Step rows carry `step_kind`, tokens/s and peak memory next to the inference peak; summarize.py
derives the ratios (b)/(c) and (a)/(b). Peak memory: on CUDA `max_memory_allocated` over the timed rounds; on the
CPU the weights plus the most bytes the allocator held beyond them during one more, profiled, call
(`cpu_peak_bytes`).
"""
import os

import pytest
import torch

from zokern import optim
from bench_utils import DEVICE, cpu_peak_bytes, environment, synchronize

pytest.importorskip("transformers")

MODELS = {  # (hidden, intermediate, layers, heads, kv heads, vocab, batch, sequence)
    "tiny": (64, 128, 2, 4, 2, 1000, 2, 16),
    "cpu-small": (256, 688, 4, 8, 4, 8000, 4, 64),
    # The embedded SmolLM2-135M's shapes (134.5M parameters, tied embeddings) and `zokern finetune`'s batch of
    # 16 prompts (about 25 tokens each); the side-path figures used ZOKERN_BENCH_BATCH=4x64 (results before that
    # setting name the model "smollm2-135m").
    "smollm2": (576, 1536, 30, 9, 3, 49152, 16, 32),
    "1b": (2048, 8192, 16, 32, 8, 128256, 16, 256),       # Llama-3.2-1B shapes
    "8b": (4096, 14336, 32, 32, 8, 128256, 16, 256),      # Llama-3-8B shapes
}
MODEL = os.environ.get("ZOKERN_BENCH_MODEL", "1b" if DEVICE == "cuda" else "cpu-small")
if MODEL not in MODELS:
    raise ValueError(f"ZOKERN_BENCH_MODEL must be one of {', '.join(MODELS)}, got {MODEL!r}")


def batch_setting(value: "str | None", default: tuple[int, int]) -> tuple[int, int]:
    """(sequences, tokens per sequence) from ZOKERN_BENCH_BATCH, "<sequences>x<tokens>"; `default` when unset."""
    if value is None:
        return default
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"ZOKERN_BENCH_BATCH must be <sequences>x<tokens> with positive integers, e.g. 4x64, "
                         f"got {value!r}")
    return int(parts[0]), int(parts[1])


BATCH = batch_setting(os.environ.get("ZOKERN_BENCH_BATCH"), MODELS[MODEL][6:])
ROUNDS = os.environ.get("ZOKERN_BENCH_ROUNDS", "3" if MODEL in ("1b", "8b") else "5")
if not ROUNDS.isdigit() or int(ROUNDS) < 1:
    raise ValueError(f"ZOKERN_BENCH_ROUNDS must be a positive integer, got {ROUNDS!r}")
ROUNDS = int(ROUNDS)
DTYPE = getattr(torch, os.environ.get("ZOKERN_BENCH_MODEL_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32"))
METHODS = {"mezo": (optim.MeZO, {}), "mezo-rademacher-bit": (optim.MeZO, {"dist": "rademacher_bit"}),
           "subzero": (optim.SubZero, {}), "sparse-mezo": (optim.SparseMeZO, {}),
           "hizoo": (optim.HiZOO, {}), "dizo": (optim.DiZO, {"project_every": 10**9})}
# Two-pass mode folds the next +εz into the update (2 passes over the weights a step, not 3); in place only.
TWO_PASS = {"mezo-two-pass": (optim.MeZO, {"two_pass": True}),
            "mezo-rademacher-bit-two-pass": (optim.MeZO, {"dist": "rademacher_bit", "two_pass": True})}
# What stochastic rounding (the 16-bit default) costs: the same step storing its updates rounded to nearest.
NEAREST = {"mezo-rademacher-bit-nearest": (optim.MeZO, {"dist": "rademacher_bit", "rounding": "nearest"})}
IN_PLACE_STEPS = {**METHODS, **TWO_PASS, **NEAREST}
EPS, LR = 1e-3, 1e-6


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = MODELS[MODEL][:6]
    batch, seq = BATCH
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=MODEL != "8b")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(DTYPE).eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)
    return model, tokens


def loss_fn(model, tokens):
    with torch.inference_mode():
        return model(input_ids=tokens, labels=tokens).loss


def mezo_reference_step(model, tokens, seed):
    """MeZO's trainer (zo_step / zo_perturb_parameters / zo_update): four eager passes, z regenerated each."""
    named = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale):
        torch.manual_seed(seed)
        for p in named:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * EPS

    perturb(1)
    loss_plus = loss_fn(model, tokens)
    perturb(-2)
    loss_minus = loss_fn(model, tokens)
    grad = ((loss_plus - loss_minus) / (2 * EPS)).item()
    perturb(1)
    torch.manual_seed(seed)
    for p in named:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - LR * grad * z


def _measure(benchmark, model, fn, kind, tokens, **info):
    def run():
        fn()
        synchronize()
    run()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:
        return
    if DEVICE == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = sum(p.numel() * p.element_size() for p in model.parameters()) + cpu_peak_bytes(run)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({
        "op": "zo_step", "step_kind": kind, "model": MODEL, "model_dtype": str(DTYPE).replace("torch.", ""),
        "batch": "x".join(map(str, tokens.shape)), "tokens_per_step": tokens.numel(),
        "tokens_per_s": tokens.numel() / median, "peak_memory_bytes": peak})


@pytest.mark.parametrize("forwards", [2, 3])
def test_forward_floor(benchmark, setup, forwards):
    model, tokens = setup
    _measure(benchmark, model, lambda: [loss_fn(model, tokens) for _ in range(forwards)], f"forward-x{forwards}",
             tokens, backend="torch", method=f"forwards-{forwards}")


def test_mezo_reference_step(benchmark, setup):
    model, tokens = setup
    seeds = iter(range(10**6))
    _measure(benchmark, model, lambda: mezo_reference_step(model, tokens, next(seeds)), "mezo-reference", tokens,
             backend="mezo-reference", method="mezo")


@pytest.mark.parametrize("method", IN_PLACE_STEPS)
def test_zokern_step(benchmark, setup, method):
    model, tokens = setup
    cls, options = IN_PLACE_STEPS[method]
    opt = cls(model.named_parameters(), lr=LR, eps=EPS, **options)
    _measure(benchmark, model, lambda: opt.step(lambda: loss_fn(model, tokens)), "zokern", tokens,
             backend=opt.backend or "auto", method=method,
             forwards=opt.forwards_per_step)


@pytest.mark.parametrize("method", METHODS)
def test_zokern_probe_step(benchmark, setup, method):
    """Probe mode (docs/OPTIMIZERS.md): the forwards compute with per-module perturbed copies, the update is the
    step's one write of the weights."""
    model, tokens = setup
    cls, options = METHODS[method]
    opt = cls(model, lr=LR, eps=EPS, **options)
    try:
        _measure(benchmark, model, lambda: opt.step(lambda: loss_fn(model, tokens)), "zokern-probes", tokens,
                 backend=opt.backend or "auto", method=method, forwards=opt.forwards_per_step)
    finally:
        opt.detach()


def test_subzero_side_path_step(benchmark, setup):
    """SubZero's side path (docs/OPTIMIZERS.md): between merges an nn.Linear adds ((x·V)·Cᵀ)·Uᵀ to x·Wᵀ and the
    step writes no matrix; the merge, one pass per window (1000 steps by default), is outside the timed steps."""
    model, tokens = setup
    opt = optim.SubZero(model, lr=LR, eps=EPS, side_path=True)
    try:
        _measure(benchmark, model, lambda: opt.step(lambda: loss_fn(model, tokens)), "zokern-side-path", tokens,
                 backend=opt.backend or "auto", method="subzero", forwards=opt.forwards_per_step)
    finally:
        opt.detach()
