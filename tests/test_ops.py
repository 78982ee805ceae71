"""Each fused op on every available backend equals the plain-PyTorch reference, over dtypes and awkward shapes."""
import pytest
import torch

import zokern
from zokern import backends
from conftest import available_pairs

PAIRS = available_pairs(include_reference=False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1,), (3,), (7,), (4, 4), (33, 17), (2, 3, 5), (1000,), (3, 1, 129)]


def tolerance(dtype):
    """z agrees across backends to a few float32 ulps; a stored bf16/fp16 value may round one ulp apart."""
    return {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
            torch.float16: dict(rtol=1e-3, atol=2e-3)}[dtype]


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in shapes]


def non_contiguous(device, dtype):
    base = torch.randn(9, 14).to(dtype=dtype, device=device)
    return [base.t(), torch.randn(20, 6).to(dtype=dtype, device=device)[::3, 1:5]]


STEP_ARGS = dict(restore=1e-3, lr=1e-2, grad=3.5, weight_decay=0.1, next_seed=77, next_scale=1e-3)
OPS = [("perturb_", dict(scale=0.5)), ("perturb_", dict(scale=-1e-3, dist="rademacher")),
       ("fused_step_", STEP_ARGS), ("fused_step_", dict(STEP_ARGS, next_seed=None, weight_decay=0.0)),
       ("fused_step_", dict(STEP_ARGS, dist="rademacher"))]


def _call(op, kw):
    kw = dict(kw)
    if op == "perturb_":
        scale = kw.pop("scale")
        return lambda params, backend: zokern.perturb_(params, 4242, scale, backend=backend,
                                                       stream_ids=list(range(100, 100 + len(params))), **kw)
    return lambda params, backend: zokern.fused_step_(params, 4242, backend=backend,
                                                      stream_ids=list(range(100, 100 + len(params))), **kw)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,kw", OPS, ids=[f"{o}{i}" for i, (o, _) in enumerate(OPS)])
def test_op_matches_reference(backend, device, dtype, op, kw):
    call = _call(op, kw)
    params = make_params(SHAPES, dtype, device) + non_contiguous(device, dtype)
    expected = [p.detach().cpu().clone() for p in params]
    call(expected, "reference")
    call(params, backend)
    for got, want in zip(params, expected):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want, **tolerance(dtype))


@pytest.mark.parametrize("backend,device", available_pairs())
def test_fused_step_equals_mezo_composition(backend, device):
    """One fused pass equals MeZO's separate restore, update and next perturbation (fp32)."""
    params = make_params([(64, 33), (17,)], torch.float32, device)
    ids = [5, 6]
    eps, lr, grad, wd = 1e-3, 1e-2, -2.0, 0.05
    separate = [p.clone() for p in params]
    zokern.perturb_(separate, 10, eps, stream_ids=ids, backend=backend)            # restore θ−εz → θ
    for p, k in zip(separate, ids):
        z = zokern.draw(10, k, p.numel(), device=device, backend=backend).view(p.shape)
        p.sub_(lr * (grad * z + wd * p))                                              # MeZO update
    zokern.perturb_(separate, 11, eps, stream_ids=ids, backend=backend)             # next +εz'
    zokern.fused_step_(params, 10, stream_ids=ids, restore=eps, lr=lr, grad=grad, weight_decay=wd,
                       next_seed=11, next_scale=eps, backend=backend)
    for got, want in zip(params, separate):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", available_pairs())
def test_per_tensor_weight_decay(backend, device):
    params = make_params([(10,), (10,)], torch.float32, device)
    off = [p.clone() for p in params]
    zokern.fused_step_(params, 3, stream_ids=[0, 1], restore=0.0, lr=0.1, grad=0.0, weight_decay=[0.5, 0.0],
                       backend=backend)
    torch.testing.assert_close(params[0], off[0] * (1 - 0.05))
    torch.testing.assert_close(params[1], off[1])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_invariant_to_order_and_grouping(backend, device):
    shapes = [(5, 7), (64,), (3,), (129, 2)]
    together = make_params(shapes, torch.float32, device)
    separately = [p.clone() for p in together]
    reversed_ = [p.clone() for p in together]
    ids = [9, 2, 31, 4]
    zokern.fused_step_(together, 8, stream_ids=ids, **STEP_ARGS, backend=backend)
    for p, k in zip(separately, ids):
        zokern.fused_step_([p], 8, stream_ids=[k], **STEP_ARGS, backend=backend)
    zokern.fused_step_(reversed_[::-1], 8, stream_ids=ids[::-1], **STEP_ARGS, backend=backend)
    for a, b, c in zip(together, separately, reversed_):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_mixed_dtypes_one_call(backend, device):
    params = make_params([(40,)], torch.float32, device) + make_params([(40,)], torch.bfloat16, device) \
        + make_params([(40,)], torch.float16, device)
    expected = [p.cpu().clone() for p in params]
    zokern.perturb_(expected, 1, 0.25, stream_ids=[0, 1, 2], backend="reference")
    zokern.perturb_(params, 1, 0.25, stream_ids=[0, 1, 2], backend=backend)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.cpu(), want, **tolerance(want.dtype))


@pytest.mark.parametrize("backend,device", available_pairs())
def test_many_tensors_few_launches(backend, device):
    """A pass over a model-sized list of tensors is one launch per dtype, not one per tensor."""
    if backend == "reference":
        pytest.skip("the reference backend is a per-tensor loop by design")
    params = make_params([(8, 3)] * 150, torch.float32, device) + make_params([(5,)] * 150, torch.bfloat16, device)
    backends.launches.clear()
    zokern.perturb_(params, 1, 1e-3, stream_ids=range(300), backend=backend)
    assert 1 <= sum(n for (name, _), n in backends.launches.items() if name == backend) <= 2  # dtypes


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", PAIRS)
def test_more_than_2_pow_24_elements(backend, device):
    n = (1 << 24) + 3
    p = torch.zeros(n, device=device)
    zokern.perturb_([p], 99, 1.0, stream_ids=[1], backend=backend)
    tail = zokern.random.reference_draw(99, 1, 1000, offset=n - 1000)
    torch.testing.assert_close(p[-1000:].cpu(), tail, rtol=2e-6, atol=2e-6)
    head = zokern.random.reference_draw(99, 1, 1000)
    torch.testing.assert_close(p[:1000].cpu(), head, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,device", available_pairs())
def test_bf16_store_rounds_to_nearest_even(backend, device):
    p = torch.randn(4096).to(device=device, dtype=torch.bfloat16)
    wide = p.float()
    zokern.perturb_([p], 5, 0.37, stream_ids=[0], backend=backend)
    zokern.perturb_([wide], 5, 0.37, stream_ids=[0], backend=backend)
    assert torch.equal(p, wide.to(torch.bfloat16))
