"""What the op-family tests (tests/ops/test_<family>.py) share: the backends, dtypes and awkward tensor lists they
are parametrized over, and the comparisons with the plain-PyTorch reference (zokern/backends/reference.py).

What is exact: every element-wise op is a documented composition of float32 operations, stored once with
round-to-nearest-even (docs/OPS.md), so given the same z a backend stores the reference's bits. The z differ:
each backend evaluates Box–Muller's log, cos and sin with its own accurate functions (a few float32 ulps,
docs/RANDOM.md; tests/ops/test_random.py bounds it). `reference_on_backend_z` therefore lets the reference draw
the backend's own z, so the element-wise tests compare bit for bit. Reductions (the low-rank product, the
distance norms) have no fixed summation order: they are compared with a float64 computation, rounded once,
within bounds that hold for any order.
"""
from __future__ import annotations

import torch
from conftest import available_pairs

from zokern import library
from zokern.backends import reference
from zokern.backends.reference import LOWRANK_OPERAND_FLUSH, lowrank_operand
from zokern.random import MASK32, Domain

# (backend, device) pairs, the reference included; a backend missing on this machine is skipped with its reason
# (CI requires all of them through $ZOKERN_REQUIRE_BACKENDS).
BACKENDS = available_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One dtype for every tensor of a call, or "mixed": the three dtypes in one call.
DTYPE_CASES = [*DTYPES, "mixed"]
DTYPE_IDS = ["float32", "bfloat16", "float16", "mixed"]
NORMAL, RADEMACHER = 0, 1
SEED, NEXT_SEED = 0x5EED_0123_4567_89AB, (1 << 63) - 1  # both key words in use
# Chunk (and block) sizes each backend's kernels take as keywords, splitting tensors unevenly; the reference
# has none. The sparse kernels need chunks of whole mask words (the C++ ones round up themselves).
CHUNKINGS = {"reference": [], "cpp": [dict(chunk=1), dict(chunk=7), dict(chunk=1000)],
             "cuda": [dict(chunk=1), dict(chunk=7), dict(chunk=1000)],
             "triton": [dict(block=256, chunk=1028)]}  # few programs: each interpreted one costs milliseconds
MASKED_CHUNKINGS = {**CHUNKINGS, "triton": [dict(block=2048, chunk=1056)]}  # a chunk shorter than a block


def dtype_of(case, i: int) -> torch.dtype:
    return DTYPES[i % len(DTYPES)] if case == "mixed" else case


def awkward_params(case, device, seed: int = 0) -> list[torch.Tensor]:
    """Every awkward layout in one call: an empty tensor, one element, odd sizes that are not multiples of 4 (a
    Philox call's four values) and exceed a 32-element mask word, a transposed matrix, a strided 3-D view, and a
    contiguous view of 4099 elements starting 3 elements into its storage (misaligned vector access, several of
    the C++ kernels' SIMD steps and a tail; one block of the Triton interpreter). With "mixed" the tensors take
    the dtypes in turn, two each. Few tensors: each is a program of its own in the Triton interpreter."""
    g = torch.Generator().manual_seed(seed)

    def tensor(i, shape):
        return torch.randn(shape, generator=g).to(dtype=dtype_of(case, i), device=device)

    return [tensor(0, (0,)), tensor(1, (1,)), tensor(2, (5, 7)), tensor(3, (9, 14)).t(),
            tensor(4, (5, 6, 7))[:, ::2, 1:], tensor(5, (4105,))[3:4102]]


def margins(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The storage around awkward_params' last view, which no op may touch."""
    base = params[-1]._base
    return [base[:3].clone(), base[4102:].clone()]


def assert_margins_untouched(params, before) -> None:
    after = margins(params)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(after, before)), "an op wrote outside its view"


def dtype_count(params) -> int:
    """The launches a multi-tensor Triton kernel makes: one per dtype among the non-empty tensors."""
    return len({p.dtype for p in params if p.numel()})


def stream_ids(n: int) -> list[int]:
    """Stream ids spread over [0, 2**32), the largest included."""
    return [MASK32] + [(i * 2654435761 + 12345) & MASK32 for i in range(1, n)]


def clones(tensors, device=None) -> list[torch.Tensor]:
    return [t.detach().to(device or t.device).clone() for t in tensors]


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def storage_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| in units of the spacing of want's dtype at |want| (for messages)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    a = want.abs()
    spacing = torch.nextafter(a, torch.tensor(float("inf"), dtype=a.dtype)).double() - a.double()
    return ((got.double() - want.double()).abs() / spacing).nan_to_num(0.0).max().item() if a.numel() else 0.0


def assert_bitwise(got_list, want_list, what: str = "") -> None:
    assert len(got_list) == len(want_list)
    for i, (got, want) in enumerate(zip(got_list, want_list)):
        assert got.dtype == want.dtype and got.shape == want.shape, (what, i)
        assert torch.equal(bits(got), bits(want)), \
            f"{what} tensor {i} ({want.dtype}, {tuple(want.shape)}): {storage_ulps(got, want)} storage ulps apart"


def reference_on_backend_z(monkeypatch, backend: str, device: str) -> None:
    """Make the reference draw the z of `backend` on `device` (its fill_random, which tests/ops/test_random.py
    checks against the reference stream), so that the ops' arithmetic alone is compared. The reference's own z
    on the CPU is the reference stream already; on a GPU its log, cos and sin are the GPU's (docs/RANDOM.md: a
    few ulps from the CPU's), so the CPU run that gives the expected bits takes that z too."""
    if backend == "reference" and device == "cpu":
        return
    fill = library.implementation("fill_random_", device, backend)
    drawn = {}  # a step's passes draw the same z again

    def z(seed, stream, p, dist, offset):
        key = (seed, stream, p.numel(), dist, offset)
        if key not in drawn:
            drawn[key] = torch.empty(p.numel(), device=device)
            fill(drawn[key], seed, stream, offset, int(Domain.PERTURBATION), dist)
        return drawn[key].to(p.device).view(p.shape)

    monkeypatch.setattr(reference, "_z", z)


def assert_launches(launches, backend: str, op: str, kernels: dict) -> None:
    """One call into the dispatch table for the whole list, and the Triton launches named (none elsewhere)."""
    assert launches.calls == {(backend, op): 1}, launches.calls
    assert launches.kernels == (kernels if backend == "triton" else {}), launches.kernels


def gamma(k: int) -> float:
    """γ_k = k·u/(1 − k·u), u = 2^-24: the relative error bound of k float32 operations in any order (Higham,
    Accuracy and Stability of Numerical Algorithms, §3.1)."""
    unit = 2.0**-24
    return k * unit / (1 - k * unit)



def backends_named(*names: str) -> list:
    """The BACKENDS pairs of the named backends: for properties only those kernels promise."""
    return [pair for pair in BACKENDS if pair.values[0] in names]


def storage_spacing(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values at each |magnitude| (float64), subnormals included."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    exponent = torch.floor(torch.log2(magnitude.double().abs().clamp_min(info.tiny)))
    return torch.pow(2.0, exponent - mantissa_bits)


def assert_lowrank_rounded_from_float32(got: torch.Tensor, w, u, v, core) -> None:
    """got = W + U·C·Vᵀ summed in float32 in any order and stored once, checked against the float64 value (for a
    bfloat16 W, of the lowrank_operand values of U·C and V).

    Each element is W + Σ_a (Σ_b U_ib C_ba) V_ja: 2r products and 2r sums in float32, so its float32 value is
    within γ_k·(|W| + Σ|U||C||V|) of the exact one, γ_k = k·u/(1 − k·u), u = 2^-24 and k = 2r + 2 (one spare)
    whatever the summation order (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). The store
    rounds that to the nearest value of W's dtype, at most half its spacing at |exact| + bound. No torch matmul
    in the weights' dtype or float32 enters: its summation order depends on the CPU's BLAS."""
    k = 2 * u.shape[1] + 2
    exact = w.double() + (u.double() @ core.double()) @ v.double().t()  # float64: 2^-29 of the bound's error
    magnitude = w.double().abs() + (u.double().abs() @ core.double().abs()) @ v.double().abs().t()
    bound = gamma(k) * magnitude
    if got.dtype == torch.bfloat16:
        # The sum over a takes lowrank_operand values: V's are known; U·C's round to bfloat16 a float32 value within
        # γ_{r+1} of the exact one, so they are within that plus half a bfloat16 spacing of it (or flushed).
        uc = u.double() @ core.double()
        uc_bound = gamma(u.shape[1] + 1) * (u.double().abs() @ core.double().abs())
        ucb_error = storage_spacing(uc.abs() + uc_bound, torch.bfloat16) / 2 + uc_bound + LOWRANK_OPERAND_FLUSH
        vb = lowrank_operand(v.float()).double()
        exact = w.double() + uc @ vb.t()
        bound = (gamma(u.shape[1] + 2) * (w.double().abs() + (uc.abs() + ucb_error) @ vb.abs().t())
                 + ucb_error @ vb.abs().t())
    allowed = bound + storage_spacing(exact.abs() + bound, got.dtype) / 2
    excess = (got.double().cpu() - exact.cpu()).abs() - allowed.cpu()
    assert (excess <= 0).all(), (tuple(got.shape), u.shape[1], got.dtype, excess.max().item())
