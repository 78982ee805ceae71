"""The Triton method kernels (low-rank, magnitude mask, diagonal Hessian, anchored rescale) against the
reference backend, with awkward sizes and every parameter dtype. On CPU they need the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported); each interpreted program costs milliseconds, so the
tensors stay small.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_lowrank_rounded_from_float32

from zokern.backends import reference as ref
from zokern.random import MASK32

tb = pytest.importorskip("zokern.backends.triton")

DEVICES = [d for d in ("cpu", "cuda") if tb.availability(d)[0]]
if not DEVICES:
    pytest.skip(f"Triton backend unavailable: cpu: {tb.availability('cpu')[1]}; "
                f"cuda: {tb.availability('cuda')[1]}", allow_module_level=True)

from zokern.kernels import dizo, hizoo, sparse, subzero  # noqa: E402  (only importable where triton is)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUMELS = [1, 31, 33, 1000]
# Element-wise results: float32 may differ by the few ulps z differs by between backends (docs/RANDOM.md),
# and the reference's CPU sqrt is not correctly rounded (the kernels' sqrt_rn is): an error of an ulp
# in z/√D shows as several ulps of a result that partly cancels it. 16-bit results may differ by one
# storage ulp (a rounding boundary).
MAX_ULPS = {torch.float32: 8.0, torch.bfloat16: 1.0, torch.float16: 1.0}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _storage_ulps(got: torch.Tensor, want: torch.Tensor, start: "torch.Tensor | None" = None) -> float:
    """max |got − want| in ulps of want's dtype, measured at the larger of |want| and |start| (an update
    that cancels the start leaves a small result whose ulp says nothing about the error)."""
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype
    a = want.abs() if start is None else torch.maximum(want.abs(), start.cpu().to(want.dtype).abs())
    spacing = torch.nextafter(a, torch.tensor(float("inf"), dtype=a.dtype)).double() - a.double()
    return ((got.double() - want.double()).abs() / spacing).max().item()


def _check_close(got_list, want_list, starts, what="", exact=False):
    """Within MAX_ULPS of the reference; bitwise where both compute the same float32 operations on the same
    values (no transcendental: Rademacher z, or no z at all)."""
    for got, want, start in zip(got_list, want_list, starts):
        if exact:
            assert torch.equal(got, want), (what, want.dtype, tuple(want.shape))
        ulps = _storage_ulps(got, want, start)
        assert ulps <= MAX_ULPS[want.dtype], (what, want.dtype, tuple(want.shape), ulps)


def _params(device, numels=NUMELS, dtypes=DTYPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device=device, dtype=dt) for dt in dtypes for n in numels]


def _streams(n):
    return [(i * 2654435761 + 12345) & MASK32 for i in range(n)]


def _clone(ts):
    return [t.clone() for t in ts]


# --- low-rank -------------------------------------------------------------------------------------------

LOWRANK_CASES = [(1, 1, 1), (17, 5, 1), (17, 5, 3), (64, 48, 8), (64, 48, 17), (100, 3, 3), (96, 80, 64),
                 (130, 300, 5)]  # the last spans two row blocks and two column tiles of the interpreter's tiling


@pytest.mark.parametrize("factor_dtype", [None, torch.float32], ids=["same", "fp32-factors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_apply_matches_float64(device, dtype, factor_dtype, launches):
    gen = torch.Generator().manual_seed(1)
    for m, n, r in LOWRANK_CASES:
        fdt = factor_dtype or dtype
        w = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
        u = (torch.randn(m, r, generator=gen) / r ** 0.5).to(device=device, dtype=fdt)
        v = (torch.randn(n, r, generator=gen) / r ** 0.5).to(device=device, dtype=fdt)
        core = torch.randn(r, r, generator=gen, device="cpu").to(device) * 0.3
        got = w.clone()
        launches.clear()
        subzero.lowrank_apply([got], [u], [v], [core])
        assert launches.kernels["lowrank_kernel"] == 1
        assert_lowrank_rounded_from_float32(got, w, u, v, core)


def test_lowrank_apply_several_tensors(device, launches):
    ws = [torch.randn(s, device=device, dtype=dt) for s, dt in (((7, 9), torch.float32), ((33, 2), torch.bfloat16))]
    us = [torch.randn(w.shape[0], 2, device=device) for w in ws]
    vs = [torch.randn(w.shape[1], 2, device=device) for w in ws]
    cores = [torch.randn(2, 2, device=device) for _ in ws]
    got = _clone(ws)
    launches.clear()
    subzero.lowrank_apply(got, us, vs, cores)
    assert launches.kernels["lowrank_kernel"] == 2
    for g, w, u, v, core in zip(got, ws, us, vs, cores):
        assert_lowrank_rounded_from_float32(g, w, u, v, core)


# --- magnitude mask ---------------------------------------------------------------------------------------

def _masks(params, gen=None):
    """Bitmask buffers: zero, or with a generator random bits (a mask stored by an earlier pass)."""
    bits = [torch.zeros(p.numel(), dtype=torch.bool) if gen is None else torch.rand(p.numel(), generator=gen) < 0.5
            for p in params]
    return [_packed(b, p.device) for b, p in zip(bits, params)]


def _packed(bits: torch.Tensor, device) -> torch.Tensor:
    """The reference's bitmask of a boolean tensor (bits past numel zero)."""
    out = torch.zeros((bits.numel() + 31) // 32, dtype=torch.int32)
    ref._pack_mask(bits.cpu(), out)
    return out.to(device)


def _thresholds(params):
    """About half of each tensor is in the mask: h is the median |θ|."""
    return torch.stack([p.float().abs().median() for p in params])


@pytest.mark.parametrize("compute_mask", [True, False])
@pytest.mark.parametrize("dist", [0, 1])
def test_masked_perturb_matches_reference(device, dist, compute_mask, launches):
    params = _params(device)
    streams = _streams(len(params))
    masks = _masks(params) if compute_mask else _masks(params, torch.Generator().manual_seed(3))
    h = _thresholds(params)
    got, want, got_m, want_m = _clone(params), _clone(params), _clone(masks), _clone(masks)
    launches.clear()
    sparse.masked_perturb(got, got_m, h, streams, 0x0123456789ABCDEF, 1e-2, compute_mask, dist)
    assert launches.kernels["masked_kernel"] == len(DTYPES)
    ref.masked_perturb(want, want_m, h, streams, 0x0123456789ABCDEF, 1e-2, compute_mask, dist)
    assert all(torch.equal(a, b) for a, b in zip(got_m, want_m))
    _check_close(got, want, params, "masked_perturb", exact=dist == 1)
    if compute_mask:
        assert any(int(m.count_nonzero()) for m in got_m)


@pytest.mark.parametrize("next_seed", [-1, (1 << 63) - 1])
@pytest.mark.parametrize("dist", [0, 1])
def test_masked_fused_step_matches_reference(device, dist, next_seed):
    params = _params(device, seed=4)
    streams = _streams(len(params))
    masks = _masks(params, torch.Generator().manual_seed(5))
    h = _thresholds(params)
    wds = [0.0 if i % 2 else 0.1 for i in range(len(params))]
    args = (h, streams, 77, 1e-2, 1e-2, -3.0, wds, next_seed, 2e-2, dist)
    got, want, got_m, want_m = _clone(params), _clone(params), _clone(masks), _clone(masks)
    sparse.masked_fused_step(got, got_m, *args)
    ref.masked_fused_step(want, want_m, *args)
    assert all(torch.equal(a, b) for a, b in zip(got_m, want_m))
    _check_close(got, want, params, "masked_fused_step", exact=dist == 1)
    if next_seed >= 0:
        assert not all(torch.equal(a, b) for a, b in zip(got_m, masks))  # the next mask was written


def test_masked_independent_of_block_and_chunk(device):
    """Chunks of 32 and 64 elements: mask words are written by many programs, never split between two."""
    params = _params(device, numels=[33, 200], seed=6)
    streams = _streams(len(params))
    h = _thresholds(params)
    results = []
    for sizes in ({}, {"block": 32, "chunk": 64}, {"block": 64, "chunk": 32}):
        ps, ms = _clone(params), _masks(params)
        sparse.masked_perturb(ps, ms, h, streams, 5, 1e-2, True, 0, **sizes)
        sparse.masked_fused_step(ps, ms, h, streams, 5, 1e-2, 1e-3, 0.5, [0.0] * len(ps), 6, 1e-2, 0, **sizes)
        results.append((ps, ms))
    for ps, ms in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ps + ms, results[0][0] + results[0][1]))


def test_masked_threshold_edges_restore_exactly(device):
    """Weights exactly at h and one ulp either side, in every dtype: perturb (+ε, mask computed from the
    unperturbed weights), flip (−2ε) and restore (lr = 0) must all use that same mask, so every weight ends
    within rounding of where it started. A kernel that re-derived the mask from perturbed weights would
    leave the edge weights displaced by ε·z."""
    eps, h32 = 0.125, 0.75
    params, starts, expect_bits = [], [], []
    for dtype in DTYPES:
        h = torch.tensor(h32, dtype=dtype)
        up = torch.nextafter(h, torch.tensor(float("inf"), dtype=dtype))
        down = torch.nextafter(h, torch.tensor(0.0, dtype=dtype))
        edge = torch.stack([h, up, down, -h, -up, -down, torch.zeros((), dtype=dtype)])
        # 70 elements: the edge values land on every bit position and a partial last word; elements 31 and
        # 63 are −h and h, so bit 31 is set and the int32 words are negative.
        x = edge.repeat(10).to(device)
        params.append(x)
        starts.append(x.clone())
        expect_bits.append(x.float().abs() <= h32)
    streams = _streams(len(params))
    h = torch.full((len(params),), h32, dtype=torch.float32, device=device)
    masks = _masks(params)
    for dist in (1, 0):
        sparse.masked_perturb(params, masks, h, streams, 11, eps, True, dist)
        for m, bits in zip(masks, expect_bits):
            assert torch.equal(m, _packed(bits, device))
            assert int(m[0]) < 0 and int(m[1]) < 0
        assert all(not torch.equal(p, s) for p, s in zip(params, starts))
        sparse.masked_perturb(params, masks, h, streams, 11, -2 * eps, False, dist)
        sparse.masked_fused_step(params, masks, h, streams, 11, eps, 0.0, 5.0, [0.0] * len(params), -1, 0.0, dist)
        for p, s in zip(params, starts):
            # Three roundings of values below 2, each at most half an ulp of 1: far less than the ε·|z| = ε a
            # Rademacher z displaces a weight by.
            err = (p.float() - s.float()).abs().max().item()
            assert err <= 1.5 * torch.finfo(p.dtype).eps, (p.dtype, dist, err)
            p.copy_(s)


# --- diagonal Hessian -------------------------------------------------------------------------------------

def _hessians(params, d_dtype_same: bool, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) * 2 + 0.25).to(device=p.device,
                                                                dtype=p.dtype if d_dtype_same else torch.float32)
            for p in params]


@pytest.mark.parametrize("d_same", [False, True], ids=["D-fp32", "D-param-dtype"])
@pytest.mark.parametrize("dist", [0, 1])
def test_hessian_perturb_matches_reference(device, dist, d_same, launches):
    params = _params(device, seed=8)
    hs = _hessians(params, d_same)
    streams = _streams(len(params))
    got, want = _clone(params), _clone(params)
    launches.clear()
    hizoo.hessian_perturb(got, hs, streams, 99, 1e-2, dist)
    assert launches.kernels["hessian_kernel"] == len(DTYPES)
    ref.hessian_perturb(want, hs, streams, 99, 1e-2, dist)
    _check_close(got, want, params, "hessian_perturb")


@pytest.mark.parametrize("next_seed", [-1, 12345678901])
@pytest.mark.parametrize("d_same", [False, True], ids=["D-fp32", "D-param-dtype"])
@pytest.mark.parametrize("dist", [0, 1])
def test_hessian_step_matches_reference(device, dist, d_same, next_seed):
    params = _params(device, seed=9)
    hs = _hessians(params, d_same)
    streams = _streams(len(params))
    wds = [0.05 * (i % 3) for i in range(len(params))]
    args = (streams, 99, 1e-2, 1e-2, 2.5, 3.7, 0.1, wds, next_seed, 1e-2, dist)
    got, want, got_d, want_d = _clone(params), _clone(params), _clone(hs), _clone(hs)
    hizoo.hessian_step(got, got_d, *args)
    ref.hessian_step(want, want_d, *args)
    _check_close(got, want, params, "hessian_step θ")
    _check_close(got_d, want_d, hs, "hessian_step D")
    assert not any(torch.equal(a, b) for a, b in zip(got_d, hs))


# --- anchored rescale -------------------------------------------------------------------------------------

def test_distance_norms_match_reference(device, launches):
    params = _params(device, numels=[1, 31, 33, 1000, 5000], seed=10)
    anchors = [p + (0.01 * torch.randn(p.shape, device=device)).to(p.dtype) for p in params]
    params.insert(3, torch.empty(0, device=device))
    anchors.insert(3, torch.empty(0, device=device))
    want = ref.distance_norms(params, anchors)
    launches.clear()
    got = dizo.distance_norms(params, anchors)
    assert launches.kernels == {"square_sums_kernel": len(DTYPES), "norms_kernel": len(DTYPES)}
    assert got.dtype == torch.float32 and got.device == params[0].device
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    # Many chunks per tensor (the partial sums), and bitwise the same on a second run.
    small = dizo.distance_norms(params, anchors, block=64, chunk=128)
    torch.testing.assert_close(small, want, rtol=1e-5, atol=0.0)
    assert torch.equal(small, dizo.distance_norms(params, anchors, block=64, chunk=128))


@pytest.mark.parametrize("with_sources", [False, True])
def test_anchored_rescale_matches_reference(device, with_sources, launches):
    params = _params(device, seed=11)
    anchors = [(p.float() + 0.1 * torch.randn(p.shape, device=device)).to(p.dtype) for p in params]
    sources = [(p.float() * 1.5).to(p.dtype) for p in params] if with_sources else None
    factors = torch.linspace(0.5, 1.5, len(params), device=device)
    got, want = _clone(params), _clone(params)
    launches.clear()
    dizo.anchored_rescale(got, anchors, sources, factors)
    assert launches.kernels["anchored_rescale_kernel"] == len(DTYPES)
    ref.anchored_rescale(want, anchors, sources, factors)
    _check_close(got, want, params, "anchored_rescale", exact=True)
