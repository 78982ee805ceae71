"""Stochastic rounding of stored updates (docs/RANDOM.md, "Stochastic rounding"; docs/OPS.md): unbiased, always one
of the two storage neighbours of the float32 result, deterministic, the same bits on every backend, keyed by
global element index (offsets), and a no-op for float32 storage."""
import math

import pytest
import torch

import zokern
from conftest import available_pairs
from zokern.random import philox4x32

PAIRS = available_pairs()
HALF = [torch.bfloat16, torch.float16]
STREAM, SEED = 5, 0x0123456789ABCDEF
# Mantissa bits: the spacing of [1, 2) is 2^-MANTISSA.
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _step(p, *, delta, backend, rounding="stochastic", seed=SEED, offsets=None):
    """fused_step_ with Rademacher z and nothing else: float32 x = p + delta·z exactly as every backend computes it
    (restore 0, lr 1, grad −delta, no decay)."""
    zokern.fused_step_([p], seed, stream_ids=[STREAM], restore=0.0, lr=1.0, grad=-delta, dist="rademacher",
                       rounding=rounding, offsets=offsets, backend=backend)


def _float32_result(theta: torch.Tensor, delta: float, seed=SEED, offset=0) -> torch.Tensor:
    """The float32 x the kernels round: θ + 0·z − 1·((−delta)·z + 0·x), as reference.fused_step computes it."""
    z = zokern.draw(seed, STREAM, theta.numel(), offset=offset, dist="rademacher").view(theta.shape)
    x = theta.float() + 0.0 * z
    return x - 1.0 * ((-delta) * z + 0.0 * x)


def _all_values(dtype) -> torch.Tensor:
    """Every non-NaN value of a 16-bit dtype, ±inf included, sorted, as float64."""
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    return torch.unique(values[~values.isnan()])


def _neighbours(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest dtype value ≤ x and the smallest ≥ x (float64), for float32 x that are not NaN. By bit pattern
    the value after the largest finite one is inf: x beyond it has neighbours (max, inf)."""
    table = _all_values(dtype)
    x64 = x.double().reshape(-1)
    lo = table[(torch.searchsorted(table, x64, right=True) - 1).clamp(min=0)]
    hi = table[torch.searchsorted(table, x64).clamp(max=table.numel() - 1)]
    return lo.view(x.shape), hi.view(x.shape)


# --- unbiasedness --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("region", ["normal", "subnormal"])
def test_stochastic_rounding_is_unbiased_and_nearest_drops_small_updates(backend, device, dtype, region):
    """2^20 elements, each moved by 0.1 of its spacing (sign from z): the mean stored change, in spacings and
    signed by z, is 0.1 within 3 standard errors; round-to-nearest stores no change at all."""
    if region == "subnormal" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 subnormals are float32's, whose spacing float32 arithmetic cannot split")
    n = 1 << 20
    g = torch.Generator().manual_seed(1)
    if region == "normal":  # values in (1, 2), whose neighbours below and above are one spacing 2^-mantissa away
        spacing = 2.0 ** -MANTISSA[dtype]
        theta = (1 + torch.randint(1, 1 << MANTISSA[dtype], (n,), generator=g) * spacing).to(dtype)
    else:  # float16 subnormals k·2^-24, 0 < k < 1023: spacing 2^-24
        spacing = 2.0 ** -24
        theta = (torch.randint(1, 1023, (n,), generator=g) * spacing).to(dtype)
    theta = theta.to(device)
    z = zokern.draw(SEED, STREAM, n, dist="rademacher", device=device)
    for rounding in ("nearest", "stochastic"):
        p = theta.clone()
        _step(p, delta=0.1 * spacing, backend=backend, rounding=rounding)
        change = (p.double() - theta.double()) / spacing * z.double()
        if rounding == "nearest":
            assert torch.count_nonzero(change) == 0
        else:
            mean, se = change.mean().item(), change.std().item() / math.sqrt(n)
            assert abs(mean - 0.1) <= 3 * se, (mean, se)
            assert set(change.unique().tolist()) <= {0.0, 1.0, -0.0, -1.0}


# --- bracketing, exact values, edge cases ----------------------------------------------------------------------

def _edge_cases(dtype) -> list[tuple[float, float]]:
    """(θ, delta) pairs: x = θ ± delta in float32."""
    top = float(torch.finfo(dtype).max)
    tiny = float(torch.finfo(dtype).smallest_normal)
    cases = [(0.0, 0.0), (0.0, 1e-45), (-0.0, 1e-45), (1.0, 0.0), (-3.5, 0.0), (1.0, 2.0 ** -30), (top, 0.0),
             (top, top / 1000), (-top, top / 1000), (tiny, tiny / 3), (tiny / 4, tiny / 7), (1.0, 1e-3)]
    if dtype == torch.float16:
        cases += [(2.0 ** -24, 2.0 ** -26), (2.0 ** -24, 2.0 ** -40), (65504.0, 31.0), (65504.0, 16.0),
                  (65504.0, 0.5), (60000.0, 8000.0)]
    else:
        cases += [(1e-39, 1e-41), (3e38, 1e37)]
    return cases


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_result_is_a_neighbour_of_the_float32_value(backend, device, dtype):
    """Every stored value is one of the two dtype values around the float32 result (exact results unchanged,
    overflow past the largest finite value to inf, zeros and subnormals included), on 4096 draws per case."""
    for theta, delta in _edge_cases(dtype):
        p0 = torch.full((4096,), theta, dtype=dtype, device=device)
        p = p0.clone()
        _step(p, delta=delta, backend=backend)
        x = _float32_result(p0.cpu(), delta).to(device)
        lo, hi = _neighbours(x.cpu(), dtype)
        got = p.cpu().double()
        assert ((got == lo) | (got == hi)).all(), (theta, delta)
        exact = lo == hi
        assert torch.equal(_bits(p.cpu())[exact], _bits(x.cpu().to(dtype))[exact]), (theta, delta)
        assert torch.equal(got.signbit()[x.cpu() == 0], x.cpu().signbit()[x.cpu() == 0])


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("order", ["by_bits", "shuffled"])
def test_every_float16_value_rounds_as_the_reference(backend, device, order):
    """Every float16 θ (NaN, ±inf, zeros and subnormals included), moved by deltas from far below its spacing to past
    the largest finite value and stored stochastically: bit for bit what the reference stores. In bit order, runs of
    neighbours share a region; shuffled, most runs mix them (the C++ kernels round runs of float16 normals by one
    vector formula, and other runs element by element)."""
    theta = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    if order == "shuffled":
        theta = theta[torch.randperm(theta.numel(), generator=torch.Generator().manual_seed(4))]
    for delta in (0.0, 2.0 ** -30, 2.0 ** -25, 2.0 ** -16, 1e-3, 0.37, 100.0, 40000.0):
        expected = theta.clone()
        _step(expected, delta=delta, backend="reference")
        got = theta.to(device, copy=True)
        _step(got, delta=delta, backend=backend)
        assert torch.equal(_bits(got.cpu()), _bits(expected)), delta


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_nan_is_the_canonical_nan_and_inf_stays(backend, device, dtype):
    p = torch.tensor([math.nan, -math.nan, math.inf, 1.0], dtype=dtype, device=device)
    _step(p, delta=1e-3, backend=backend)  # inf − 0·inf is NaN too (the weight decay term)
    assert _bits(p.cpu())[:3].tolist() == [0x7FFF] * 3
    w = torch.tensor([[math.inf, -math.inf, 1.0]], dtype=dtype, device=device)
    ones = torch.ones(1, 1, device=device)
    zokern.lowrank_apply_([w], [ones], [torch.ones(3, 1, device=device)], [ones * 1e-3], rounding="stochastic",
                          seed=SEED, stream_ids=[STREAM], backend=backend)
    assert w[0, :2].tolist() == [math.inf, -math.inf]


# --- the same bits everywhere, deterministic, keyed by global index ----------------------------------------------

def _rounding_ops(dtype, device, backend, offsets=None, rows=None, seed=SEED):
    """Runs every op that stores an update with stochastic rounding on fresh inputs whose float32 results are the
    same on every backend (Rademacher draws, exact low-rank products); returns what they stored."""
    g = torch.Generator().manual_seed(3)
    n = 1001

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    out = {}
    p = rand(n)
    zokern.fused_step_([p], seed, stream_ids=[STREAM], restore=1e-3, lr=1e-3, grad=0.37, weight_decay=0.1,
                       next_seed=seed + 1, next_scale=1e-3, dist="rademacher", rounding="stochastic", offsets=offsets,
                       backend=backend)
    out["fused_step_"] = p
    for next_seed in (None, seed + 1):
        p, masks = rand(n), None
        masks = zokern.new_masks([p])
        h = torch.tensor([0.7], device=device)
        zokern.masked_perturb_([p], masks, h, seed, 1e-3, stream_ids=[STREAM], compute_mask=True,
                               dist="rademacher", offsets=offsets, backend=backend)
        zokern.masked_fused_step_([p], masks, h, seed, stream_ids=[STREAM], restore=1e-3, lr=1e-3, grad=0.37,
                                  next_seed=next_seed, next_scale=1e-3, dist="rademacher", rounding="stochastic",
                                  offsets=offsets, backend=backend)
        out[f"masked_fused_step_ next={next_seed}"] = p
        out[f"masks next={next_seed}"] = masks[0]
    p, d = rand(n), (rand(n).abs() + 0.5).float()
    zokern.hessian_step_([p], [d], seed, stream_ids=[STREAM], restore=1e-3, lr=1e-3, grad=0.37, hess_scale=2.0,
                         alpha=0.25, dist="rademacher", rounding="stochastic", offsets=offsets, backend=backend)
    out["hessian_step_"], out["hessians"] = p, d
    a, s = rand(n), rand(n)
    zokern.anchored_rescale_([s], [a], torch.tensor([0.999], device=device), rounding="stochastic", seed=seed,
                             stream_ids=[STREAM], offsets=offsets, backend=backend)
    out["anchored_rescale_"] = s
    # Integers times a power of two: every product and sum is exact in float32, whatever the order. Rows longer than
    # a C++ tile's 64 columns and not a multiple of 8: a tile row's rounding words span two vectors of calls.
    m, cols, r = 24, 137, 2
    w = rand(m, cols)
    u = torch.randint(-8, 8, (m, r), generator=g).float().to(device)
    v = torch.randint(-8, 8, (cols, r), generator=g).float().to(device)
    c = (torch.randint(-8, 8, (r, r), generator=g).float() * 2.0 ** -14).to(device)
    zokern.lowrank_apply_([w], [u], [v], [c], rounding="stochastic", seed=seed, stream_ids=[STREAM], offsets=offsets,
                          backend=backend)
    out["lowrank_apply_"] = w
    return out


def _rounding_words_by_definition(seed: int, stream: int, first: int, n: int) -> torch.Tensor:
    """docs/RANDOM.md's rounding words of elements first … first + n − 1, from the raw Philox words: element e's is
    half e & 1 (the low one first) of word (e >> 1) & 3 of call e >> 3 in domain ROUNDING (4)."""
    e = torch.arange(first, first + n, dtype=torch.int64)
    calls = e >> 3
    words = torch.stack(philox4x32((calls & 0xFFFFFFFF, calls >> 32, stream, 4), (seed & 0xFFFFFFFF, seed >> 32)), -1)
    word = words.gather(1, ((e >> 1) & 3)[:, None])[:, 0]
    return (word >> (16 * (e & 1))) & 0xFFFF


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("offset", [0, 5, 12])
def test_rounding_words_are_the_16_bit_halves_of_the_calls(backend, device, dtype, offset):
    """The stored bits are docs/RANDOM.md's formulas (normal values) with the rounding words taken from the raw
    Philox words: eight elements to a call, 16 bits each (stream version 5), at any element offset."""
    n = 203
    g = torch.Generator().manual_seed(9)
    theta = (1 + torch.rand(n, generator=g)).to(dtype)
    delta = 0.37 * 2.0 ** -MANTISSA[dtype]
    p = theta.to(device, copy=True)
    _step(p, delta=delta, backend=backend, offsets=[offset])
    u = _float32_result(theta, delta, offset=offset).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = _rounding_words_by_definition(SEED, STREAM, offset, n)
    if dtype == torch.bfloat16:
        expected = (u + r) >> 16
    else:  # values in [1, 2): float16 normals
        expected = (u - (112 << 23) + (r & 0x1FFF)) >> 13
    assert torch.equal(_bits(p.cpu()).to(torch.int64) & 0xFFFF, expected)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_same_bits_on_every_backend_and_deterministic(dtype):
    pairs = [p.values for p in PAIRS if not any(m.name == "skip" for m in p.marks)]
    results = {(b, d): _rounding_ops(dtype, d, b) for b, d in pairs}
    first = next(iter(results.values()))
    for key, got in results.items():
        for name, t in got.items():
            assert torch.equal(_bits(t.cpu()), _bits(first[name].cpu())), (key, name)
    again = _rounding_ops(dtype, "cpu", "reference")
    other_seed = _rounding_ops(dtype, "cpu", "reference", seed=SEED + 7)
    for name in again:
        assert torch.equal(_bits(again[name]), _bits(first[name].cpu())), name
    assert not torch.equal(_bits(other_seed["fused_step_"]), _bits(again["fused_step_"]))


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rounding_follows_the_global_element_index(backend, device, dtype):
    """Pieces of a tensor at their offsets round exactly as the whole tensor: rows of a low-rank W at offset
    row·n, runs of an element-wise tensor at odd offsets."""
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(301, generator=g).to(dtype).to(device)
    cuts = [0, 37, 38, 301]
    whole = theta.clone()
    _step(whole, delta=1e-3, backend=backend, offsets=[11])
    pieces = [theta[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    zokern.fused_step_(pieces, SEED, stream_ids=[STREAM] * 3, restore=0.0, lr=1.0, grad=-1e-3, dist="rademacher",
                       rounding="stochastic", offsets=[11 + c for c in cuts[:-1]], backend=backend)
    assert torch.equal(_bits(torch.cat(pieces)), _bits(whole))

    w = torch.randn(24, 37, generator=g).to(dtype).to(device)
    u, v = torch.ones(24, 1, device=device), torch.ones(37, 1, device=device)
    c = torch.full((1, 1), 2.0 ** -12, device=device)
    whole = w.clone()
    zokern.lowrank_apply_([whole], [u], [v], [c], rounding="stochastic", seed=SEED, stream_ids=[STREAM],
                          backend=backend)
    top, bottom = w[:9].clone(), w[9:].clone()
    zokern.lowrank_apply_([top, bottom], [u[:9], u[9:]], [v, v], [c, c], rounding="stochastic", seed=SEED,
                          stream_ids=[STREAM] * 2, offsets=[0, 9 * 37], backend=backend)
    assert torch.equal(_bits(torch.cat([top, bottom])), _bits(whole))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_float32_storage_ignores_rounding(backend, device):
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(777, generator=g).to(device)
    got = {}
    for rounding in ("nearest", "stochastic"):
        p = theta.clone()
        zokern.fused_step_([p], SEED, stream_ids=[STREAM], restore=1e-3, lr=1e-2, grad=0.5, rounding=rounding,
                           backend=backend)
        got[rounding] = p
    assert torch.equal(got["nearest"], got["stochastic"])


# --- input checks, opcheck ---------------------------------------------------------------------------------

BAD = [
    ("unknown rounding", lambda ps: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1.0, grad=1.0,
                                                       rounding="up"), ValueError, "unknown rounding"),
    ("rounding code", lambda ps: torch.ops.zokern.fused_step_(ps, [0, 1], 1, 0.0, 1.0, 1.0, [0.0, 0.0], -1, 0.0, 0,
                                                              "", [], 2), ValueError, "unknown rounding"),
    ("no seed", lambda ps: zokern.anchored_rescale_(ps, [p.clone() for p in ps], torch.ones(2),
                                                    rounding="stochastic", stream_ids=[0, 1]), ValueError, "seed"),
    ("no stream ids", lambda ps: zokern.lowrank_apply_([ps[0]], [torch.ones(5, 1)], [torch.ones(3, 1)],
                                                       [torch.ones(1, 1)], rounding="stochastic", seed=3),
     ValueError, "stream_ids"),
    ("stream count", lambda ps: zokern.anchored_rescale_(ps, [p.clone() for p in ps], torch.ones(2),
                                                         rounding="stochastic", seed=1, stream_ids=[0]),
     ValueError, "stream ids"),
]


@pytest.mark.parametrize("what,call,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_rounding_arguments_are_rejected_and_nothing_changes(what, call, error, match):
    params = [torch.randn(5, 3).to(torch.bfloat16), torch.randn(7).to(torch.float16)]
    before = [p.clone() for p in params]
    with pytest.raises(error, match=match):
        call(params)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("op", ["fused_step_", "masked_fused_step_", "hessian_step_", "lowrank_apply_",
                                "anchored_rescale_"])
def test_opcheck_with_stochastic_rounding(backend, device, op):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 5, generator=g).to(device, torch.float16),
              torch.randn(41, generator=g).to(device, torch.bfloat16)]
    hessians = [torch.rand(6, 5, generator=g).to(device) + 0.5, torch.rand(41, generator=g).to(device) + 0.5]
    masks, h = zokern.new_masks(params), torch.tensor([0.5, 0.7], device=device)
    u, v = torch.randn(6, 2, generator=g).to(device), torch.randn(5, 2, generator=g).to(device)
    step = (1e-3, 1e-2, 2.0)
    args = {
        "fused_step_": (params, [1, 2], 7, *step, [0.1, 0.0], 8, 1e-3, 0, backend, [3, 5], 1),
        "masked_fused_step_": (params, masks, h, [1, 2], 7, *step, [0.1, 0.0], 8, 1e-3, 0, backend, [3, 5], 1),
        "hessian_step_": (params, hessians, [1, 2], 7, *step, 3.0, 0.1, [0.1, 0.0], 8, 1e-3, 0, backend, [3, 5], 1),
        "lowrank_apply_": ([params[0]], [u], [v], [torch.randn(2, 2, generator=g).to(device)], backend, [4], 9, [6],
                           1),
        "anchored_rescale_": (params, [p + 0.1 for p in params], None, torch.tensor([0.9, 1.1], device=device),
                              backend, [1, 2], 9, [3, 5], 1),
    }[op]
    torch.library.opcheck(getattr(torch.ops.zokern, op), args)


# --- the optimizers pass their rounding to every update --------------------------------------------------------

OPTIMIZERS = {
    "mezo": (zokern.optim.MeZO, {}),
    "subzero": (zokern.optim.SubZero, dict(rank=2, subspace_every=2)),
    "sparse": (zokern.optim.SparseMeZO, dict(sparsity=0.5)),
    "hizoo": (zokern.optim.HiZOO, dict(alpha=0.5)),
    "dizo": (zokern.optim.DiZO, dict(project_every=2, project_iters=1, project_pattern=r"0\.weight")),
}


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _train(method, dtype, steps=4, records=None, **options):
    model = _model(dtype)
    cls, settings = OPTIMIZERS[method]
    opt = cls(model.named_parameters(), lr=1e-4, eps=1e-2, seed=3, **settings, **options)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g).to(dtype), torch.randn(32, 4, generator=g)
    closure = lambda: ((model(x).float() - y) ** 2).mean()  # noqa: E731
    if records is not None:
        opt.record_hook = records.append
    for _ in range(steps):
        opt.step(closure, fresh_closure=lambda: closure)
    return model, opt


@pytest.mark.parametrize("method", OPTIMIZERS)
def test_optimizer_default_keeps_float32_runs_bitwise(method):
    default, _ = _train(method, torch.float32)
    nearest, _ = _train(method, torch.float32, rounding="nearest")
    for a, b in zip(default.parameters(), nearest.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", OPTIMIZERS)
def test_optimizer_rounds_16_bit_updates_stochastically_and_replays_bitwise(method):
    records = []
    trained, opt = _train(method, torch.bfloat16, records=records)
    nearest, _ = _train(method, torch.bfloat16, rounding="nearest")
    assert opt.rounding == "stochastic" and opt.state_dict()["zo"]["rounding"] == "stochastic"
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), nearest.parameters()))
    replayed = _model(torch.bfloat16)
    cls, settings = OPTIMIZERS[method]
    again = cls(replayed.named_parameters(), lr=1e-4, eps=1e-2, seed=3, **settings)
    for record in records:
        again.replay_step(record)
    for a, b in zip(trained.parameters(), replayed.parameters()):
        assert torch.equal(_bits(a.detach()), _bits(b.detach()))


def test_optimizer_state_carries_rounding():
    _, opt = _train("mezo", torch.bfloat16, steps=1)
    other = zokern.optim.MeZO(_model(torch.bfloat16).named_parameters(), lr=1e-4, eps=1e-2, seed=3,
                              rounding="nearest")
    other.load_state_dict(opt.state_dict())
    assert other.rounding == "stochastic"
    old = opt.state_dict()
    del old["zo"]["rounding"]  # a state saved before rounding was recorded: trained with round-to-nearest
    other.load_state_dict(old)
    assert other.rounding == "nearest"
    with pytest.raises(ValueError, match="unknown rounding"):
        zokern.optim.MeZO(_model(torch.bfloat16).parameters(), rounding="up")


def test_finetune_rounding_setting():
    from zokern.cli import build_parser
    from zokern.finetune.config import ConfigError, FinetuneConfig, check_config
    from zokern.finetune.train import make_optimizer

    assert build_parser().parse_args(["finetune", "--rounding", "nearest"]).rounding == "nearest"
    assert build_parser().parse_args(["finetune"]).rounding is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--rounding", "up"])
    with pytest.raises(ConfigError, match="--rounding 'up'"):
        check_config(FinetuneConfig(rounding="up"))
    with pytest.raises(ConfigError, match="set it with --rounding"):
        check_config(FinetuneConfig(method_options={"rounding": "nearest"}))
    config = FinetuneConfig(rounding="nearest")
    check_config(config)
    assert make_optimizer(config, list(_model(torch.bfloat16).named_parameters())).rounding == "nearest"
    assert make_optimizer(FinetuneConfig(), list(_model(torch.bfloat16).named_parameters())).rounding == "stochastic"


def test_replay_of_a_log_from_before_rounding_uses_nearest():
    from dataclasses import asdict

    from zokern.finetune.config import FinetuneConfig
    from zokern.finetune.replay import _run_config

    header = {"trainable": ["w"], "base_sha256": "0" * 64, "backend": "reference"}
    old = {k: v for k, v in asdict(FinetuneConfig()).items() if k != "rounding"}
    assert _run_config("run.jsonl", {**header, "config": old}, []).rounding == "nearest"
    assert _run_config("run.jsonl", {**header, "config": asdict(FinetuneConfig())}, []).rounding is None


@pytest.mark.parametrize("backend,device", PAIRS)
def test_masked_step_with_next_perturbation_is_the_step_then_masked_perturb(backend, device):
    """Sparse MeZO's fused pass: the update rounded as chosen, the next mask from it, the perturbed weights
    rounded to nearest — bitwise the unfused step followed by masked_perturb_."""
    g = torch.Generator().manual_seed(6)
    theta = torch.randn(333, generator=g).to(torch.bfloat16).to(device)
    h = torch.tensor([0.8], device=device)
    kw = dict(stream_ids=[STREAM], dist="rademacher", backend=backend)
    step = dict(restore=1e-3, lr=1e-3, grad=0.37, rounding="stochastic", **kw)
    fused, masks = theta.clone(), zokern.new_masks([theta])
    zokern.masked_perturb_([fused], masks, h, SEED, -1e-3, compute_mask=True, **kw)
    unfused, unfused_masks = fused.clone(), [masks[0].clone()]
    zokern.masked_fused_step_([fused], masks, h, SEED, next_seed=SEED + 1, next_scale=1e-3, **step)
    zokern.masked_fused_step_([unfused], unfused_masks, h, SEED, **step)
    zokern.masked_perturb_([unfused], unfused_masks, h, SEED + 1, 1e-3, compute_mask=True, **kw)
    assert torch.equal(_bits(fused), _bits(unfused)) and torch.equal(masks[0], unfused_masks[0])
