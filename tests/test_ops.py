"""Each fused op on every available backend equals the plain-PyTorch reference, over dtypes and awkward shapes."""
import pytest
import torch

import zokern
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
def test_many_tensors_few_launches(backend, device, launches):
    """A pass over a model-sized list of tensors is one call into the backend, and one Triton launch per dtype,
    not one per tensor."""
    if backend == "reference":
        pytest.skip("the reference backend is a per-tensor loop by design")
    params = make_params([(8, 3)] * 150, torch.float32, device) + make_params([(5,)] * 150, torch.bfloat16, device)
    zokern.perturb_(params, 1, 1e-3, stream_ids=range(300), backend=backend)
    assert launches.calls == {(backend, "perturb_"): 1}
    assert launches.kernels == ({"zo_update_kernel": 2} if backend == "triton" else {})


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


# --- input checks that hold on every backend: they run before any tensor is written --------------------------

def _unchanged(tensors, before):
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("backend,device", available_pairs())
@pytest.mark.parametrize("views", [lambda x: [x[0:6], x[2:8]], lambda x: [x[2:8], x.view(2, 4)],
                                   lambda x: [x.view(2, 4).t(), x[3:4]], lambda x: [x[::2], x[2::4]]],
                         ids=["shifted slices", "slice and whole", "transpose and element", "nested strides"])
def test_overlapping_views_are_rejected(backend, device, views):
    """Aliasing is overlap of the bytes each view can touch in one storage, not equal data pointers."""
    x = torch.randn(8, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match=r"params\[\d\] and params\[\d\] share memory"):
        zokern.perturb_(views(x), 1, 1.0, stream_ids=[0, 1], backend=backend)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend,device", available_pairs())
def test_interleaved_views_are_accepted(backend, device):
    """x[::2] and x[1::2] share a storage and a byte range but no element: they are two tensors."""
    x = torch.randn(4, 6, device=device)
    expected = [x[:, ::2].clone(), x[:, 1::2].clone()]
    zokern.perturb_(expected, 3, 0.5, stream_ids=[0, 1], backend="reference")
    zokern.perturb_([x[:, ::2], x[:, 1::2]], 3, 0.5, stream_ids=[0, 1], backend=backend)
    torch.testing.assert_close(x[:, ::2], expected[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x[:, 1::2], expected[1], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,device", available_pairs())
def test_companions_overlapping_written_tensors_are_rejected(backend, device):
    x = torch.randn(16, device=device)
    buffer = torch.zeros(4, dtype=torch.int32, device=device)
    before, mask_before = x.clone(), buffer.clone()
    with pytest.raises(ValueError, match=r"params\[0\] and anchors\[1\] share memory"):
        zokern.anchored_rescale_([x[:8], x[8:]], [x[8:], x[:8]], torch.ones(2, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"masks\[0\] and masks\[1\] share memory"):
        zokern.masked_perturb_([x[:8], x[8:]], [buffer[0:1], buffer[0:1]], torch.ones(2, device=device), 1, 0.5,
                               stream_ids=[0, 1], compute_mask=True, backend=backend)
    with pytest.raises(ValueError, match=r"params\[0\] and hessians\[0\] share memory"):
        zokern.hessian_step_([x[:8]], [x[4:12]], 1, stream_ids=[0], restore=0.1, lr=0.1, grad=1.0, hess_scale=1.0,
                             alpha=0.1, backend=backend)
    w = torch.randn(3, 3, device=device)
    w_before = w.clone()
    with pytest.raises(ValueError, match=r"weights\[0\] and us\[0\] share memory"):  # not element-wise
        zokern.lowrank_apply_([w], [w], [torch.randn(3, 3, device=device)], [torch.eye(3, device=device)],
                              backend=backend)
    assert torch.equal(x, before) and torch.equal(buffer, mask_before) and torch.equal(w, w_before)


@pytest.mark.parametrize("backend,device", available_pairs())
def test_element_wise_reads_may_be_the_written_tensor(backend, device):
    """sources=params is the default spelled out: each element is read before it is written."""
    params = make_params([(6, 5), (40,)], torch.float32, device)
    anchors = [torch.zeros_like(p) for p in params]
    factors = torch.tensor([2.0, 0.5], device=device)
    expected = [p.clone() for p in params]
    zokern.anchored_rescale_(expected, anchors, factors, backend=backend)
    zokern.anchored_rescale_(params, anchors, factors, sources=params, backend=backend)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


@pytest.mark.parametrize("backend,device", available_pairs())
def test_expanded_tensor_is_rejected_before_any_write(backend, device):
    """A stride-0 view cannot take a write-back; it is rejected before the tensors ahead of it are written."""
    params = [torch.randn(5, device=device), torch.randn(3, device=device).expand(4, 3)]
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"params\[1\] addresses some elements more than once"):
        zokern.perturb_(params, 1, 1.0, stream_ids=[0, 1], backend=backend)
    with pytest.raises(ValueError, match=r"params\[1\] addresses some elements more than once"):
        zokern.fused_step_(params, 1, stream_ids=[0, 1], restore=0.1, lr=0.1, grad=1.0, backend=backend)
    with pytest.raises(ValueError, match=r"hessians\[0\] addresses some elements more than once"):
        zokern.hessian_step_(params[:1], [torch.ones(1, device=device).expand(5)], 1, stream_ids=[0], restore=0.1,
                             lr=0.1, grad=1.0, hess_scale=1.0, alpha=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] addresses some elements more than once"):
        zokern.fill_random_(torch.zeros(1, device=device).expand(4), 1, 0, backend=backend)
    assert _unchanged(params, before)
    read_only = [torch.ones(1, device=device).expand(5)]  # a read-only expanded tensor is fine
    zokern.hessian_perturb_(params[:1], read_only, 1, 0.5, stream_ids=[0], backend=backend)
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("backend,device", available_pairs())
@pytest.mark.parametrize("call,message", [
    (lambda ps, b: zokern.perturb_(ps, 1, 1e39, stream_ids=[0, 1], backend=b), "scale must be finite in float32"),
    (lambda ps, b: zokern.perturb_(ps, 1, -1e38, stream_ids=[0, 1], backend=b), r"scale \* z overflows float32"),
    (lambda ps, b: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1e39, grad=1.0, backend=b),
     "lr must be finite in float32"),
    (lambda ps, b: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1e30, grad=1e10, backend=b),
     r"lr \* grad \* z overflows float32"),
    (lambda ps, b: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1e-3, grad=1.0,
                                      weight_decay=[0.0, 10**400], backend=b), r"weight_decay\[1\] must be finite"),
    (lambda ps, b: zokern.hessian_perturb_(ps, [torch.ones_like(p) for p in ps], 1, 2**200, stream_ids=[0, 1],
                                           backend=b), "scale must be finite in float32"),
], ids=["scale 1e39", "scale times z", "lr 1e39", "lr times grad", "huge weight decay", "huge int scale"])
def test_scalars_are_checked_in_float32(backend, device, call, message):
    """A scalar finite in float64 but not in float32 (or whose product with z is not) would write ±inf."""
    params = [torch.randn(5, device=device), torch.randn(7, device=device).to(torch.bfloat16)]
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=message):
        call(params, backend)
    assert _unchanged(params, before)


def test_step_scalars_are_checked_by_one_function():
    """check_step_args is what the ops and the optimizers call before their first write."""
    from zokern.validation import check_step_args

    check_step_args(seed=1, dist=0, restore=1e-3, lr=1e30, grad=1e-30, next_scale=1e-3)
    for scalars, message in [(dict(lr=1e39), "lr must be finite in float32"),
                             (dict(lr=1e20, grad=1e20), r"lr \* grad \* z overflows"),
                             (dict(next_scale=-1e38), r"next_scale \* z overflows"),
                             (dict(alpha=10**400), "alpha must be finite")]:
        with pytest.raises(ValueError, match=message):
            check_step_args(seed=1, dist=0, **scalars)


@pytest.mark.parametrize("backend,device", available_pairs())
def test_strided_factors_thresholds_and_masks_are_honoured(backend, device):
    """Every tensor argument is read through its strides, whichever backend runs."""
    params = make_params([(6, 5), (40,)], torch.float32, device)
    anchors = [torch.zeros_like(p) for p in params]
    factors = torch.tensor([2.0, -1.0, 0.5, -1.0], device=device)[::2]
    expected = [p.clone() for p in params]
    zokern.anchored_rescale_(expected, anchors, factors.contiguous(), backend="reference")
    zokern.anchored_rescale_(params, anchors, factors, backend=backend)
    torch.testing.assert_close(params, expected, rtol=2e-6, atol=2e-6)

    thresholds = torch.tensor([0.5, 9.0, 1.0, 9.0], device=device)[::2]
    mask_buffer = torch.full((2, 6), 7, dtype=torch.int32, device=device)
    masks = [mask_buffer[0, 0:1], mask_buffer[1, ::3]]  # 1 word, and 2 words 3 apart
    expected, expected_masks = [p.clone() for p in params], [m.clone() for m in masks]
    zokern.masked_perturb_(expected, expected_masks, thresholds.contiguous(), 5, 0.5, stream_ids=[0, 1],
                           compute_mask=True, backend="reference")
    zokern.masked_perturb_(params, masks, thresholds, 5, 0.5, stream_ids=[0, 1], compute_mask=True,
                           backend=backend)
    torch.testing.assert_close(params, expected, rtol=2e-6, atol=2e-6)
    assert all(torch.equal(m, e) for m, e in zip(masks, expected_masks))
    untouched = torch.ones_like(mask_buffer, dtype=torch.bool)
    untouched[0, 0] = untouched[1, 0] = untouched[1, 3] = False
    assert mask_buffer[untouched].eq(7).all()  # the words between the strided ones


META = dict(device="meta")
META_X = torch.empty(4, **META)
FAKE_CALLS = [
    ("masked_fused_step_", ([torch.empty(4, **META)], [torch.zeros(1, dtype=torch.int32, **META)],
                            torch.ones(1, **META), [0], -1, 0.0, 1e-3, 1.0, [0.0], -1, 0.0, 0)),
    ("masked_perturb_", ([torch.empty(4, **META)], [torch.zeros(1, dtype=torch.int32, **META)],
                         torch.ones(1, **META), [0], 1, 1e39, True, 0)),
    ("hessian_perturb_", ([torch.empty(4, **META)], [torch.ones(4, **META)], [1 << 32], 1, 0.5, 0)),
    ("hessian_step_", ([torch.empty(4, **META)], [torch.ones(4, **META)], [0], 1, 0.0, float("nan"), 1.0, 1.0, 0.1,
                       [0.0], -1, 0.0, 0)),
    ("distance_norms", ([torch.empty(4, dtype=torch.int64, **META)], [torch.empty(4, dtype=torch.int64, **META)])),
    ("perturb_", ([META_X, META_X[1:]], [0, 1], 1, 0.5, 0)),
]


@pytest.mark.parametrize("op,args", FAKE_CALLS, ids=["masked step seed", "masked perturb scale", "hessian stream",
                                                     "hessian step lr", "norms dtype", "aliasing"])
def test_fakes_run_the_same_checks(op, args):
    """Meta tensors (as under tracing) go to the fake implementations: they reject what the device
    implementations reject."""
    with pytest.raises((ValueError, TypeError)):
        getattr(torch.ops.zokern, op)(*args, "")
