"""SubZero's op, lowrank_apply_ (docs/OPS.md, "Low-rank perturbation"), on every backend: W + U·C·Vᵀ within the
float32 error bound of a float64 computation rounded once to W's dtype (the summation order is the backend's), over
dtypes, ranks, ragged tiles, transposed, misaligned and empty weights, strided and mixed-dtype factors; the C++
kernels bit for bit in element.h's order (a fused multiply-add per rank index); one call per list; invariant to
grouping and order; opcheck."""
import pytest
import torch
from op_cases import (BACKENDS, DTYPE_CASES, DTYPE_IDS, assert_bitwise, assert_launches,
                      assert_lowrank_rounded_from_float32, backends_named, clones, dtype_of)

import zokern
from zokern.backends.reference import lowrank_operand

LOWRANK_BLOCK = 32  # element.h's kLowrankBlock

# (m, n, rank): one element, odd sizes, a rank above the tile's 16, a full rank of 64, a thin matrix, ragged 64×64
# tiles (70×130), two row blocks and column tiles of the interpreter's 128×256 tiling (130×300), and a rank past
# the C++ kernels' 64-column panels (the core in two, U·C's second tile ragged).
MATRICES = [(1, 1, 1), (17, 5, 3), (64, 48, 17), (96, 80, 64), (100, 3, 3), (70, 130, 8), (130, 300, 5),
            (21, 70, 81)]


def lowrank_case(case, device, seed=0, factor_dtypes=None):
    """Weights (after an empty one) that are in turn contiguous, transposed views and views 3 elements into their
    storage; U and V alternately transposed views; C float32. Factors in the weight's dtype, or
    `factor_dtypes` (U's, V's)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype=dtype, device=device)

    ws, us, vs, cs = [randn(0, 5, dtype=dtype_of(case, 0))], [randn(0, 2)], [randn(5, 2)], [randn(2, 2)]
    for i, (m, n, r) in enumerate(MATRICES, start=1):
        dtype = dtype_of(case, i)
        u_dtype, v_dtype = factor_dtypes or (dtype, dtype)
        w = [randn(m, n, dtype=dtype), randn(n, m, dtype=dtype).t(),
             randn(m * n + 3, dtype=dtype)[3:].view(m, n)][i % 3]
        ws.append(w)
        us.append(randn(r, m, dtype=u_dtype).t() if i % 2 else randn(m, r, dtype=u_dtype))
        vs.append(randn(n, r, dtype=v_dtype) if i % 2 else randn(r, n, dtype=v_dtype).t())
        cs.append(randn(r, r) / r)
    return ws, us, vs, cs


FACTORS = [pytest.param(case, None, id=f"{name}") for case, name in zip(DTYPE_CASES, DTYPE_IDS)] + \
    [pytest.param("mixed", (torch.float32, torch.float16), id="mixed-fp32-fp16-factors")]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case,factor_dtypes", FACTORS)
def test_matches_float64_rounded_once(backend, device, case, factor_dtypes, launches):
    ws, us, vs, cs = lowrank_case(case, device, factor_dtypes=factor_dtypes)
    originals = clones(ws)
    zokern.lowrank_apply_(ws, us, vs, cs, backend=backend)
    assert_launches(launches, backend, "lowrank_apply_", {"subzero_kernel": len(MATRICES)})  # none for the empty W
    for got, w, u, v, c in zip(ws, originals, us, vs, cs):
        assert_lowrank_rounded_from_float32(got, w, u, v, c)


def fma32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a·b of float32 tensors rounded once to float32, as a fused multiply-add: a·b is exact in float64; the
    float64 sum is rounded to odd (TwoSum's error says whether it was inexact and on which side), and a sum rounded
    to odd at 53 bits rounds to nearest at 24 bits as the exact one would (Boldo and Melquiond, 2008)."""
    p, c = a.double() * b.double(), acc.double()
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    even = (s.view(torch.int64) & 1) == 0
    s = torch.where((err != 0) & even, torch.nextafter(s, torch.where(err > 0, torch.inf, -torch.inf)), s)
    return s.float()


def test_fma32_rounds_once():
    """The emulated fused multiply-add keeps what two roundings lose: −1 + (1 + 2^-23)(1 − 2^-23) is −2^-46
    exactly, while float32(1 − 2^-46) is 1 and the two-rounding form gives 0."""
    acc, a, b = torch.tensor([-1.0]), torch.tensor([1 + 2.0**-23]), torch.tensor([1 - 2.0**-23])
    assert (acc + a * b).item() == 0.0
    assert fma32(acc, a, b).item() == -2.0**-46


def lowrank_in_documented_order(w, u, v, c):
    """element.h's order, each step a fused multiply-add (fma32): U·C over b, then the sum over a; for a bfloat16 W,
    of lowrank_operand values, in blocks of 32 rank indices (the even ones' sum plus the odd ones', added to the
    earlier blocks' sum)."""
    w, u, v, c = (t.cpu() for t in (w, u, v, c))
    uc = torch.zeros(u.shape[0], c.shape[1])
    for b in range(c.shape[0]):
        uc = fma32(uc, u[:, b:b + 1].float(), c[b])
    delta = torch.zeros(w.shape)
    if w.dtype == torch.bfloat16:
        uc, v = lowrank_operand(uc), lowrank_operand(v.float())
        for a0 in range(0, c.shape[1], LOWRANK_BLOCK):
            sums = [torch.zeros(w.shape), torch.zeros(w.shape)]  # even, odd
            for a in range(a0, min(c.shape[1], a0 + LOWRANK_BLOCK)):
                sums[(a - a0) % 2] = fma32(sums[(a - a0) % 2], uc[:, a:a + 1], v[:, a])
            delta = delta + (sums[0] + sums[1])
        return (w.float() + delta).to(w.dtype)
    for a in range(c.shape[1]):
        delta = fma32(delta, uc[:, a:a + 1], v[:, a].float())
    return (w.float() + delta).to(w.dtype)


@pytest.mark.parametrize("backend,device", backends_named("cpp", "cuda"))
@pytest.mark.parametrize("case,factor_dtypes", FACTORS)
def test_native_kernels_sum_in_the_documented_order(backend, device, case, factor_dtypes):
    """The C++ kernels, CPU and CUDA alike, bit for bit in the order element.h fixes."""
    ws, us, vs, cs = lowrank_case(case, device, seed=1, factor_dtypes=factor_dtypes)
    want = [lowrank_in_documented_order(w, u, v, c) for w, u, v, c in zip(ws, us, vs, cs)]
    zokern.lowrank_apply_(ws, us, vs, cs, backend=backend)
    assert_bitwise(ws, want)


@pytest.mark.parametrize("backend,device", backends_named("cpp", "cuda"))
def test_bfloat16_sums_take_blocks_of_even_and_odd_indices(backend, device):
    """Sums whose bfloat16 result tells the order apart (float32 differences rarely survive the store): with C = I
    and V = 1 a row's products are its U entries. Row 0 is 1 in element.h's order and 0 in one chain; row 1 is 0,
    and 1 with even and odd indices summed over the whole rank; row 2 is 0, and 1 with delta + e + o left to
    right; rows 3 and 4 are 0, and 1 where the even (row 3) or odd (row 4) sum takes a later index first."""
    big = 2.0**24
    u = torch.zeros(5, 64)
    u[0, [0, 1, 2]] = torch.tensor([big, 1.0, -big])
    u[1, [0, 1, 32]] = torch.tensor([big, 1.0, -big])
    u[2, [0, 32, 33]] = torch.tensor([2 * big, -2 * big, 1.0])
    u[3, [0, 4, 6]] = torch.tensor([big, 1.0, -big])
    u[4, [1, 5, 7]] = torch.tensor([big, 1.0, -big])
    w = torch.zeros(5, 70, dtype=torch.bfloat16, device=device)
    args = ([u.bfloat16().to(device)], [torch.ones(70, 64, dtype=torch.bfloat16, device=device)],
            [torch.eye(64, device=device)])
    want = lowrank_in_documented_order(w, args[0][0], args[1][0], args[2][0])
    assert want.float()[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    zokern.lowrank_apply_([w], *args, backend=backend)
    assert_bitwise([w], [want.to(device)])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bfloat16_operands_are_rounded_before_the_sum(backend, device):
    """Every backend rounds U·C to bfloat16 before it multiplies (docs/OPS.md): with C = I, U·C's first column is
    1 + 2^-8, half-way between two bfloat16 values, which rounds to 1 (nearest even); V = (1, 2^-20) adds a little
    above it. The stored W is 1, where the unrounded sum, just above the half-way point, would store 1 + 2^-7."""
    u = torch.tensor([[1 + 2.0**-8, 1.0]], device=device)
    v = torch.tensor([[1.0, 2.0**-20]], device=device)
    w = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    zokern.lowrank_apply_([w], [u], [v], [torch.eye(2, device=device)], backend=backend)
    assert w.item() == 1.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_invariant_to_grouping_and_order(backend, device):
    ws, us, vs, cs = lowrank_case("mixed", device, seed=2)
    base = clones(ws)
    zokern.lowrank_apply_(base, us, vs, cs, backend=backend)
    got = clones(ws)
    for k in range(len(ws)):
        zokern.lowrank_apply_(got[k:k + 1], us[k:k + 1], vs[k:k + 1], cs[k:k + 1], backend=backend)
    assert_bitwise(got, base, "one call per tensor")
    got = clones(ws)
    zokern.lowrank_apply_(got[::-1], us[::-1], vs[::-1], cs[::-1], backend=backend)
    assert_bitwise(got, base, "reversed")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    ws, us, vs, cs = (x[1:4] for x in lowrank_case("mixed", device))
    torch.library.opcheck(torch.ops.zokern.lowrank_apply_, (ws, us, vs, cs, backend))


META = dict(device="meta")


@pytest.mark.parametrize("v_rows,core", [(3, torch.empty(3, 3, **META)), (5, torch.empty(2, 2, **META)),
                                         (3, torch.empty(2, 2, dtype=torch.float16, **META))],
                         ids=["core shape", "V rows", "core dtype"])
def test_fakes_run_the_same_checks(v_rows, core):
    """Meta tensors (as under tracing) go to the fake implementation: it rejects what the device
    implementations reject (W 4×3, U 4×2)."""
    with pytest.raises((ValueError, TypeError)):
        torch.ops.zokern.lowrank_apply_([torch.empty(4, 3, **META)], [torch.empty(4, 2, **META)],
                                        [torch.empty(v_rows, 2, **META)], [core], "")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_factors_overlapping_the_weights_are_rejected(backend, device):
    """U, V and C are read for every element of W: not element-wise, so they may not be W itself."""
    w = torch.randn(3, 3, device=device)
    before = w.clone()
    with pytest.raises(ValueError, match=r"weights\[0\] and us\[0\] share memory"):
        zokern.lowrank_apply_([w], [w], [torch.randn(3, 3, device=device)], [torch.eye(3, device=device)],
                              backend=backend)
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 8), (torch.bfloat16, 1), (torch.float16, 1)], ids=str)
def test_bound_fails_a_result_off_by_ulps(dtype, ulps):
    """The float64 comparison can fail: 1 + 1·0.5·1 stored `ulps` storage ulps off 1.5 is rejected (16-bit: one
    ulp; float32: the bound of 4 float32 operations allows about 3 ulps at 1.5)."""
    w, u, v = (torch.ones(1, 1, dtype=dtype) for _ in range(3))
    c = torch.full((1, 1), 0.5)
    right = torch.full((1, 1), 1.5, dtype=dtype)
    assert_lowrank_rounded_from_float32(right, w, u, v, c)
    spacing = torch.finfo(dtype).eps  # the spacing in [1, 2)
    with pytest.raises(AssertionError):
        assert_lowrank_rounded_from_float32((right.double() + ulps * spacing).to(dtype), w, u, v, c)
