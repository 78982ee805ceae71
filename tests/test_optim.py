"""The optimizers: fidelity to the authors' algorithms (tests/reference), learning, passes per step,
non-finite losses, schedulers and bitwise resume."""
import copy
import math
from unittest import mock

import pytest
import torch

from zokern import ops, optim
from conftest import available_pairs
from reference.dizo import DiZOReference
from reference.hizoo import HiZOOReference
from reference.mezo import mezo_step
from reference.sparse import SparseMeZOReference
from reference.subzero import SubZeroReference

CPU_BACKENDS = [p for p in available_pairs() if p.values[1] == "cpu"]


class TinyLM(torch.nn.Module):
    """A one-layer transformer language model, small enough for many CPU steps."""

    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layer = torch.nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)))


def make_task(seed=0, batch=8, length=12, vocab=40):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    tokens = (start + torch.arange(length)) % vocab  # next token = this token + 1: learnable
    return tokens


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return TinyLM().eval()


HP = dict(lr=1e-3, eps=1e-3)
# HiZOO's curvature |L+ + L− − 2L0|/(2ε²) amplifies float32 loss rounding by 1/ε²: a larger ε keeps two
# float32 runs of the same algorithm comparable.
HIZOO_HP = dict(lr=1e-3, eps=1e-2)


def run_reference(method, model, steps, batches):
    named = list(model.named_parameters())
    closure = lambda: lm_loss(model, batches[0])  # noqa: E731
    if method == "mezo":
        for t in range(steps):
            mezo_step(named, closure, 7, t, weight_decay=0.1, **HP)
    elif method == "subzero":
        ref = SubZeroReference(rank=3, every=8)
        for t in range(steps):
            ref.step(named, closure, 7, t, **HP)
    elif method == "sparse":
        ref = SparseMeZOReference(named, sparsity=0.8)
        for t in range(steps):
            ref.step(named, closure, 7, t, **HP)
    elif method == "hizoo":
        ref = HiZOOReference(named, alpha=1e-3)
        for t in range(steps):
            ref.step(named, closure, 7, t, weight_decay=0.1, **HIZOO_HP)
    elif method == "dizo":
        ref = DiZOReference(named, {"layer.linear1.weight", "layer.self_attn.out_proj.weight"}, every=10, iters=3,
                            gamma_eps=0.1, gamma_lr=2.0, tau=0.2)
        it = iter(batches[1:])
        fresh = lambda: (lambda b: lambda: lm_loss(model, b))(next(it))  # noqa: E731
        for t in range(steps):
            ref.step(named, closure, fresh, 7, t, **HP)


METHOD_SETTINGS = {
    "mezo": (optim.MeZO, dict(weight_decay=0.1, **HP)),
    "subzero": (optim.SubZero, dict(rank=3, subspace_every=8, **HP)),
    "sparse": (optim.SparseMeZO, dict(sparsity=0.8, **HP)),
    "hizoo": (optim.HiZOO, dict(alpha=1e-3, weight_decay=0.1, **HIZOO_HP)),
    "dizo": (optim.DiZO, dict(project_every=10, project_iters=3, project_pattern=r"linear1\.weight|out_proj\.weight",
                              **HP)),
}


def make_optimizer(method, model, backend, **overrides):
    cls, settings = METHOD_SETTINGS[method]
    return cls(model.named_parameters(), **{"seed": 7, "backend": backend, **settings, **overrides})


def run_optimizer(method, model, steps, batches, backend, opt=None):
    opt = opt or make_optimizer(method, model, backend)
    closure = lambda: lm_loss(model, batches[0])  # noqa: E731
    it = iter(batches[1:])
    fresh = lambda: (lambda b: lambda: lm_loss(model, b))(next(it))  # noqa: E731
    for _ in range(steps):
        opt.step(closure, fresh_closure=fresh)  # used by DiZO's search, ignored by the others
    return opt


METHODS = ["mezo", "subzero", "sparse", "hizoo", "dizo"]


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_authors_algorithm(method, backend, device):
    """20 steps of the fused optimizer equal the plain transcription of the authors' step (fp32)."""
    batches = [make_task(i) for i in range(8)]
    reference, fused = fresh_model(), fresh_model()
    run_reference(method, reference, 20, batches)
    run_optimizer(method, fused, 20, batches, backend)
    moved = False
    for (name, a), (_, b) in zip(reference.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{method} {name}: {m}")
        moved |= not torch.equal(b, fresh_model().state_dict()[name])
    assert moved


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_subzero_sign_cores_match_the_reference(backend, device):
    """SubZero(core_dist="rademacher_bit") draws ±1 cores: 20 steps equal the reference drawing its cores so, and
    differ from the Gaussian cores' run; an unknown core_dist is refused by name."""
    batches = [make_task(i) for i in range(8)]
    named_reference, signs, gaussian = fresh_model(), fresh_model(), fresh_model()
    reference = SubZeroReference(rank=3, every=8, core_dist="rademacher_bit")
    named = list(named_reference.named_parameters())
    for t in range(20):
        reference.step(named, lambda: lm_loss(named_reference, batches[0]), 7, t, **HP)
    run_optimizer("subzero", signs, 20, batches, backend,
                  make_optimizer("subzero", signs, backend, core_dist="rademacher_bit"))
    run_optimizer("subzero", gaussian, 20, batches, backend)
    for (name, a), (_, b) in zip(named_reference.named_parameters(), signs.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    weight = "layer.linear1.weight"
    assert not torch.equal(signs.get_parameter(weight), gaussian.get_parameter(weight))
    with pytest.raises(ValueError, match="core_dist"):
        make_optimizer("subzero", fresh_model(), backend, core_dist="uniform")


@pytest.mark.parametrize("method", METHODS)
def test_lowers_the_loss(method):
    model, tokens = fresh_model(), make_task(0, batch=32)
    # SparseMeZO with half the weights moving, so that 100 steps show progress
    opt = make_optimizer(method, model, None, lr=1e-2, **({"sparsity": 0.5} if method == "sparse" else {}))
    before = float(lm_loss(model, tokens))
    run_optimizer(method, model, 100, [tokens] * 200, None, opt=opt)
    assert float(lm_loss(model, tokens)) < before - 0.1


def _count_passes(opt, closure, steps):
    names = ["perturb_", "fused_step_", "lowrank_apply_", "masked_perturb_", "masked_fused_step_"]
    counters = {}
    patches = [mock.patch.object(ops, n, wraps=getattr(ops, n)) for n in names]
    with contextlib_exit(patches) as mocks:
        for _ in range(steps):
            opt.step(closure)
        counters = {n: m.call_count for n, m in zip(names, mocks)}
    return counters


class contextlib_exit:
    def __init__(self, patches):
        self.patches = patches

    def __enter__(self):
        return [p.__enter__() for p in self.patches]

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.__exit__(*exc)


@pytest.mark.parametrize("method", ["mezo", "subzero", "sparse"])
@pytest.mark.parametrize("two_pass", [False, True])
def test_passes_per_step(method, two_pass):
    """Per step: +εz, −2εz, fused restore+update = 3 passes; two-pass mode: 2 (after the first step)."""
    model, tokens = fresh_model(), make_task(0)
    opt = make_optimizer(method, model, None, two_pass=two_pass)
    closure = lambda: lm_loss(model, tokens)  # noqa: E731
    opt.step(closure)
    counts = _count_passes(opt, closure, 4)
    kinds = 2 if method != "mezo" else 1  # SubZero/Sparse: matrices and vectors each get their own op
    assert sum(counts.values()) == 4 * (2 if two_pass else 3) * kinds


@pytest.mark.parametrize("method", ["mezo", "subzero", "sparse"])
def test_two_pass_mode_trains_like_three_pass(method):
    batches = [make_task(0)]
    three, two = fresh_model(), fresh_model()
    run_optimizer(method, three, 12, batches, None)
    opt = run_optimizer(method, two, 12, batches, None, opt=make_optimizer(method, two, None, two_pass=True))
    assert opt.pending_seed is not None
    with opt.unperturbed():
        for a, b in zip(three.parameters(), two.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert opt.pending_seed is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite_loss_restores_weights(method, mode):
    model, tokens = fresh_model(), make_task(0)
    opt = make_optimizer(method, model, None, on_nonfinite=mode)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return torch.tensor(math.nan) if calls["n"] == opt.forwards_per_step else lm_loss(model, tokens)

    before = copy.deepcopy(model.state_dict())
    if mode == "raise":
        with pytest.raises(optim.NonFiniteLossError, match="non-finite loss"):
            opt.step(closure)
    else:
        with pytest.warns(RuntimeWarning, match="non-finite loss"):
            opt.step(closure)
    assert opt.nonfinite_steps == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_state_dict_is_bitwise(method):
    batches = [make_task(i) for i in range(40)]
    straight = fresh_model()
    run_optimizer(method, straight, 24, batches, None)

    first = fresh_model()
    opt = run_optimizer(method, first, 12, batches, None)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = fresh_model(seed=1)  # different initial weights, overwritten by the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = make_optimizer(method, resumed, None)
    opt2.load_state_dict(saved_opt)
    rest = batches[:1] + batches[1 + 12 * (method == "dizo") // 10 * 3:]  # DiZO consumed 3 fresh batches
    run_optimizer(method, resumed, 12, rest, None, opt=opt2)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_scheduler_and_zero_grad():
    model, tokens = fresh_model(), make_task(0)
    opt = optim.MeZO(model.named_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        opt.zero_grad()
        opt.step(lambda: lm_loss(model, tokens))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_stream_ids_do_not_depend_on_parameter_order():
    a, b = fresh_model(), fresh_model()
    tokens = make_task(0)
    opt_a = optim.MeZO(list(a.named_parameters()), lr=1e-3, seed=3)
    opt_b = optim.MeZO(list(b.named_parameters())[::-1], lr=1e-3, seed=3)
    for _ in range(3):
        opt_a.step(lambda: lm_loss(a, tokens))
        opt_b.step(lambda: lm_loss(b, tokens))
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_bad_configuration_is_rejected():
    model = fresh_model()
    with pytest.raises(ValueError, match="eps"):
        optim.MeZO(model.parameters(), eps=0.0)
    with pytest.raises(ValueError, match="two-pass"):
        optim.HiZOO(model.parameters(), two_pass=True)
    with pytest.raises(ValueError, match="closure"):
        optim.MeZO(model.parameters()).step()


def test_hizoo_keeps_a_float32_hessian_through_resume_of_a_bf16_model():
    model = fresh_model().to(torch.bfloat16)
    tokens = make_task(0)
    opt = optim.HiZOO(model.named_parameters(), lr=1e-3, eps=1e-2, alpha=0.5)
    for _ in range(2):
        opt.step(lambda: lm_loss(model, tokens).float())
    saved = copy.deepcopy(opt.state_dict())
    opt2 = optim.HiZOO(model.named_parameters(), lr=1e-3, eps=1e-2, alpha=0.5)
    opt2.load_state_dict(saved)
    for a, b in zip(opt.buckets[0].extra["hessians"], opt2.buckets[0].extra["hessians"]):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    assert any(not torch.equal(d, torch.ones_like(d)) for d in opt2.buckets[0].extra["hessians"])
