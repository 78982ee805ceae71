"""DiZO's ops, distance_norms and anchored_rescale_ (docs/OPS.md, "Anchored rescale"), on every backend, over dtypes
and awkward layouts: the norms within the float32 error bound of a float64 computation (their summation order is
the backend's), the rescale bit for bit the reference's, with and without sources, strided factors; one launch per
dtype; invariant to chunking, grouping and order; opcheck; overlapping companions rejected."""
import pytest
import torch
from conftest import backend_kernels
from op_cases import (BACKENDS, CHUNKINGS, DTYPE_CASES, DTYPE_IDS, assert_bitwise, assert_launches,
                      assert_margins_untouched, awkward_params, clones, dtype_count, gamma, margins)

import zokern


def anchors_for(params, seed=1) -> list[torch.Tensor]:
    """θ0 near θ, in θ's dtype; a matrix's anchor is a transposed view."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        noise = 0.1 * torch.randn(p.shape[::-1] if p.dim() == 2 else p.shape, generator=g)
        noise = noise.t() if p.dim() == 2 else noise
        out.append((p.detach().cpu().float() + noise).to(p.dtype).to(p.device))
    return out


def strided_factors(n: int, device) -> torch.Tensor:
    return torch.linspace(-1.5, 2.0, 2 * n, device=device)[::2]


def assert_norms_within_float32_bound(got, params, anchors) -> None:
    """Each norm within γ_{n+3}·‖θ − θ0‖ of the float64 value: θ − θ0 and its square are rounded once each, n
    terms are summed in any order, and the square root adds half the relative error and one rounding."""
    assert got.dtype == torch.float32 and got.shape == (len(params),) and got.device == params[0].device
    for k, (p, a) in enumerate(zip(params, anchors)):
        exact = torch.linalg.vector_norm(p.detach().cpu().double() - a.detach().cpu().double()).item()
        error = abs(got[k].item() - exact)
        assert error <= gamma(p.numel() + 3) * exact, (k, p.dtype, tuple(p.shape), got[k].item(), exact)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_distance_norms_match_float64(backend, device, case, launches):
    params = awkward_params(case, device)
    anchors = anchors_for(params)
    got = zokern.distance_norms(params, anchors, backend=backend)
    n = dtype_count(params)
    assert_launches(launches, backend, "distance_norms", {"dizo_square_sums_kernel": n, "dizo_norms_kernel": n})
    assert_norms_within_float32_bound(got, params, anchors)
    assert got[0].item() == 0.0  # the empty tensor
    assert torch.equal(got, zokern.distance_norms(params, anchors, backend=backend)), "deterministic"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_distance_norms_over_many_chunks(backend, device):
    """Partial sums over many chunks of a longer tensor, within the same bound, and bitwise the same on a rerun."""
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(4099, generator=g).to(device), torch.randn(1000, generator=g).to(device, torch.bfloat16)]
    anchors = anchors_for(params)
    kernel = backend_kernels(backend, device)
    # Interpreted Triton programs are costly: chunks of 512 still make ten of them.
    for sizes in (CHUNKINGS[backend] if backend != "triton" else [dict(block=64, chunk=512)]) + [{}]:
        got = kernel.distance_norms(params, anchors, **sizes)
        assert_norms_within_float32_bound(got, params, anchors)
        assert torch.equal(got, kernel.distance_norms(params, anchors, **sizes)), sizes


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_sources", [False, True], ids=["in-place", "sources"])
def test_anchored_rescale_matches_reference_bitwise(backend, device, case, with_sources, launches):
    """θ0 + (src − θ0)·f in float32, stored once: no draws, so the reference's bits on every backend."""
    params = awkward_params(case, device)
    anchors = anchors_for(params)
    sources = anchors_for(params, seed=2) if with_sources else None
    factors = strided_factors(len(params), device)
    outside = margins(params)
    want = clones(params, "cpu")
    zokern.anchored_rescale_(want, clones(anchors, "cpu"), factors.cpu(),
                             sources=None if sources is None else clones(sources, "cpu"), backend="reference")
    launches.clear()
    zokern.anchored_rescale_(params, anchors, factors, sources=sources, backend=backend)
    assert_launches(launches, backend, "anchored_rescale_", {"dizo_rescale_kernel": dtype_count(params)})
    assert_bitwise(params, want)
    assert_margins_untouched(params, outside)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_anchored_rescale_invariant_to_chunking_grouping_and_order(backend, device):
    params = awkward_params("mixed", device, seed=3)
    anchors = anchors_for(params)
    factors = strided_factors(len(params), device)
    base = clones(params)
    zokern.anchored_rescale_(base, anchors, factors, backend=backend)
    kernel = backend_kernels(backend, device)
    for sizes in CHUNKINGS[backend]:
        got = [p.contiguous() for p in clones(params)]
        kernel.anchored_rescale(got, [a.contiguous() for a in anchors], None, factors.contiguous(), **sizes)
        assert_bitwise(got, base, f"chunks {sizes}")
    got = clones(params)
    for k in range(len(params)):
        zokern.anchored_rescale_(got[k:k + 1], anchors[k:k + 1], factors[k:k + 1], backend=backend)
    assert_bitwise(got, base, "one call per tensor")
    got = clones(params)
    zokern.anchored_rescale_(got[::-1], anchors[::-1], factors.flip(0), backend=backend)
    assert_bitwise(got, base, "reversed")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_element_wise_reads_may_be_the_written_tensor(backend, device):
    """sources=params is the default spelled out: each element is read before it is written."""
    params = awkward_params("mixed", device, seed=4)
    anchors = anchors_for(params)
    factors = strided_factors(len(params), device)
    expected = clones(params)
    zokern.anchored_rescale_(expected, anchors, factors, backend=backend)
    zokern.anchored_rescale_(params, anchors, factors, sources=params, backend=backend)
    assert_bitwise(params, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["distance_norms", "anchored_rescale_"])
def test_opcheck(backend, device, op):
    params = awkward_params("mixed", device)[1:4]
    anchors = anchors_for(params)
    args = {"distance_norms": (params, anchors, backend),
            "anchored_rescale_": (params, anchors, anchors_for(params, seed=2), strided_factors(3, device),
                                  backend)}[op]
    torch.library.opcheck(getattr(torch.ops.zokern, op), args)


META = dict(device="meta")


@pytest.mark.parametrize("op,args", [
    ("distance_norms", ([torch.empty(4, dtype=torch.int64, **META)], [torch.empty(4, dtype=torch.int64, **META)])),
    ("distance_norms", ([torch.empty(4, **META)], [torch.empty(5, **META)])),
    ("anchored_rescale_", ([torch.empty(4, **META)], [torch.empty(4, **META)], None, torch.ones(2, **META))),
], ids=["norms dtype", "anchor shape", "factor count"])
def test_fakes_run_the_same_checks(op, args):
    """Meta tensors (as under tracing) go to the fake implementations: they reject what the device
    implementations reject."""
    with pytest.raises((ValueError, TypeError)):
        getattr(torch.ops.zokern, op)(*args, "")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_anchors_overlapping_written_tensors_are_rejected(backend, device):
    x = torch.randn(16, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match=r"params\[0\] and anchors\[1\] share memory"):
        zokern.anchored_rescale_([x[:8], x[8:]], [x[8:], x[:8]], torch.ones(2, device=device), backend=backend)
    assert torch.equal(x, before)
