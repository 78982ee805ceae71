"""HiZOO's ops, hessian_perturb_ and hessian_step_ (docs/OPS.md, "Diagonal Hessian"), on every backend: a whole
step (perturb, the fused step with and without the next perturbation) bit for bit the reference's for θ and D over
dtypes and awkward layouts, D in float32 and in the weights' dtype in one call; one launch per (θ, D) dtype pair;
invariant to chunking, grouping and order; opcheck; bad input rejected before any write."""
import itertools

import pytest
import torch
from conftest import backend_kernels
from op_cases import (BACKENDS, CHUNKINGS, DTYPE_CASES, DTYPE_IDS, NEXT_SEED, NORMAL, RADEMACHER, SEED,
                      assert_bitwise, assert_launches, assert_margins_untouched, awkward_params, clones, margins,
                      reference_on_backend_z, stream_ids)

import zokern

SCALE, LR, GRAD, HESS_SCALE, ALPHA = 1e-2, 1e-2, -3.5, 40.0, 0.3
CASES = [pytest.param(case, dist, id=f"{name}-{'normal' if dist == NORMAL else 'rademacher'}")
         for case, name in zip(DTYPE_CASES, DTYPE_IDS) for dist in (NORMAL, RADEMACHER)
         if name == "mixed" or dist == NORMAL]


@pytest.fixture
def exact_sqrt(monkeypatch):
    """torch's vectorised CPU sqrt is within an ulp, not correctly rounded (about 1 in 5 float32 results differ);
    the kernels' is IEEE. In double and rounded once it is exact, so the comparison stays bitwise."""
    sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: sqrt(x.double()).to(x.dtype))


def hessians_for(params, seed=1) -> list[torch.Tensor]:
    """Positive D, float32 for every other tensor and in the weights' dtype for the rest; a matrix's D is a
    transposed view."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, p in enumerate(params):
        shape = p.shape[::-1] if p.dim() == 2 else p.shape
        d = (0.25 + torch.rand(shape, generator=g)).to(dtype=torch.float32 if k % 2 else p.dtype, device=p.device)
        out.append(d.t() if p.dim() == 2 else d)
    return out


def step(params, hessians, backend, dist=NORMAL, ids=None, kernel=None, sizes=None):
    """A HiZOO step, yielding the op after each pass; with `kernel`, its kernels called directly."""
    ids = stream_ids(len(params)) if ids is None else ids
    wds = [0.1 * (k % 3) for k in ids]
    if kernel is None:
        zokern.hessian_perturb_(params, hessians, SEED, SCALE, stream_ids=ids, dist=dist, backend=backend)
    else:
        kernel.hessian_perturb(params, hessians, ids, SEED, SCALE, dist, **sizes)
    yield "hessian_perturb_"
    for seed, next_seed, alpha in ((SEED, NEXT_SEED, ALPHA), (NEXT_SEED, None, 1e-3)):
        if kernel is None:
            zokern.hessian_step_(params, hessians, seed, stream_ids=ids, restore=SCALE, lr=LR, grad=GRAD,
                                 hess_scale=HESS_SCALE, alpha=alpha, weight_decay=wds, next_seed=next_seed,
                                 next_scale=SCALE, dist=dist, backend=backend)
        else:
            kernel.hessian_step(params, hessians, ids, seed, SCALE, LR, GRAD, HESS_SCALE, alpha, wds,
                                -1 if next_seed is None else next_seed, SCALE, dist, **sizes)
        yield "hessian_step_"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case,dist", CASES)
def test_step_matches_reference_bitwise(backend, device, case, dist, monkeypatch, exact_sqrt, launches):
    params = awkward_params(case, device)
    hessians = hessians_for(params)
    outside = margins(params)
    reference_on_backend_z(monkeypatch, backend, device)
    want_params, want_hessians = clones(params, "cpu"), clones(hessians, "cpu")
    wanted = [(clones(want_params), clones(want_hessians))
              for _ in step(want_params, want_hessians, "reference", dist)]
    pairs = len({(p.dtype, d.dtype) for p, d in zip(params, hessians) if p.numel()})
    launches.clear()
    for op, (want_p, want_d) in zip(step(params, hessians, backend, dist), wanted):
        assert_launches(launches, backend, op, {"hizoo_kernel": pairs})
        launches.clear()
        assert_bitwise(params, want_p, f"{op}: θ")
        assert_bitwise(hessians, want_d, f"{op}: D")
    assert_margins_untouched(params, outside)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_invariant_to_chunking_grouping_and_order(backend, device):
    params = awkward_params("mixed", device, seed=2)
    hessians = hessians_for(params, seed=3)
    ids = stream_ids(len(params))
    base, base_d = clones(params), clones(hessians)
    for _ in itertools.islice(step(base, base_d, backend), 2):  # perturb, and the step with the next perturbation
        pass
    kernel = backend_kernels(backend, device)
    for sizes in CHUNKINGS[backend]:
        got, got_d = [p.contiguous() for p in clones(params)], [d.contiguous() for d in clones(hessians)]
        for _ in itertools.islice(step(got, got_d, backend, kernel=kernel, sizes=sizes), 2):
            pass
        assert_bitwise(got, base, f"chunks {sizes}: θ")
        assert_bitwise(got_d, base_d, f"chunks {sizes}: D")
    got, got_d = clones(params), clones(hessians)
    for k in range(len(params)):
        for _ in itertools.islice(step(got[k:k + 1], got_d[k:k + 1], backend, ids=ids[k:k + 1]), 2):
            pass
    assert_bitwise(got, base, "one call per tensor: θ")
    assert_bitwise(got_d, base_d, "one call per tensor: D")
    got, got_d = clones(params), clones(hessians)
    for _ in itertools.islice(step(got[::-1], got_d[::-1], backend, ids=ids[::-1]), 2):
        pass
    assert_bitwise(got, base, "reversed: θ")
    assert_bitwise(got_d, base_d, "reversed: D")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["hessian_perturb_", "hessian_step_"])
def test_opcheck(backend, device, op):
    params = awkward_params("mixed", device)[1:4]
    hessians = hessians_for(params)
    ids = stream_ids(len(params))
    args = {"hessian_perturb_": (params, hessians, ids, SEED, SCALE, NORMAL, backend),
            "hessian_step_": (params, hessians, ids, SEED, SCALE, LR, GRAD, HESS_SCALE, ALPHA, [0.1, 0.0, 0.2],
                              NEXT_SEED, SCALE, NORMAL, backend)}[op]
    torch.library.opcheck(getattr(torch.ops.zokern, op), args)


META = dict(device="meta")


@pytest.mark.parametrize("op,args", [
    ("hessian_perturb_", ([torch.empty(4, **META)], [torch.ones(4, **META)], [1 << 32], 1, 0.5, 0)),
    ("hessian_step_", ([torch.empty(4, **META)], [torch.ones(4, **META)], [0], 1, 0.0, float("nan"), 1.0, 1.0, 0.1,
                       [0.0], -1, 0.0, 0)),
    ("hessian_step_", ([torch.empty(4, **META)], [torch.ones(4, dtype=torch.float64, **META)], [0], 1, 0.0, 0.1,
                       1.0, 1.0, 0.1, [0.0], -1, 0.0, 0)),
], ids=["perturb stream", "step lr", "D dtype"])
def test_fakes_run_the_same_checks(op, args):
    """Meta tensors (as under tracing) go to the fake implementations: they reject what the device
    implementations reject."""
    with pytest.raises((ValueError, TypeError)):
        getattr(torch.ops.zokern, op)(*args, "")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_written_hessians_must_be_their_own_memory(backend, device):
    """hessian_step_ writes D: a D sharing memory with θ, or expanded, is rejected before any write;
    hessian_perturb_ only reads D, so an expanded D is fine there."""
    x = torch.randn(16, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match=r"params\[0\] and hessians\[0\] share memory"):
        zokern.hessian_step_([x[:8]], [x[4:12]], 1, stream_ids=[0], restore=0.1, lr=0.1, grad=1.0, hess_scale=1.0,
                             alpha=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"hessians\[0\] addresses some elements more than once"):
        zokern.hessian_step_([x[:5]], [torch.ones(1, device=device).expand(5)], 1, stream_ids=[0], restore=0.1,
                             lr=0.1, grad=1.0, hess_scale=1.0, alpha=0.1, backend=backend)
    with pytest.raises(ValueError, match="scale must be finite in float32"):
        zokern.hessian_perturb_([x[:5]], [torch.ones(5, device=device)], 1, 2**200, stream_ids=[0], backend=backend)
    assert torch.equal(x, before)
    zokern.hessian_perturb_([x[:5]], [torch.ones(1, device=device).expand(5)], 1, 0.5, stream_ids=[0],
                            backend=backend)
    assert not torch.equal(x[:5], before[:5]) and torch.equal(x[5:], before[5:])
