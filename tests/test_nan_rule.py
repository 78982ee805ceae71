"""One NaN rule on every backend (docs/OPS.md): a NaN stored in bfloat16 or float16 is the canonical NaN 0x7FFF,
whatever NaN the float32 math produced: NaN weights of either sign with any payload, quiet or signalling, and NaN
made by the math itself (∞ − ∞). Checked bit for bit on every available backend and device against the
reference on the CPU."""
import pytest
import torch
from conftest import available_pairs, backend_kernels

from zokern.ops import new_masks

NORMAL, RADEMACHER = 0, 1
SEED, NEXT = 0x5EED_0123_4567_89AB, 424242
CANONICAL_NAN = 0x7FFF
DTYPES = [torch.bfloat16, torch.float16]
# Quiet and signalling NaNs, both signs, small and full payloads (16-bit patterns).
NAN_BITS = {torch.bfloat16: [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FA5, 0xFFFF, 0x7FFF],
            torch.float16: [0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7D55, 0xFFFF, 0x7FFF]}
PAIRS = available_pairs(include_reference=True)
# The Triton interpreter's numpy warns about the NaNs and infinities made here on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.int16).to(torch.int32) & 0xFFFF


def with_nans(dtype: torch.dtype, numel: int = 64, shift: int = 0) -> torch.Tensor:
    """Values in [-2, 2] with every NaN pattern of NAN_BITS[dtype] spread among them."""
    x = torch.linspace(-2, 2, numel).roll(shift).to(dtype)
    patterns = torch.tensor(NAN_BITS[dtype], dtype=torch.int32)
    positions = torch.arange(len(patterns)) * (numel // len(patterns)) + shift % 5
    x.view(torch.int16)[positions] = torch.where(patterns >= 0x8000, patterns - 0x10000, patterns).to(torch.int16)
    return x


def run_ops(backend, device, dtype):
    """Every in-place op of the backend interface on NaN-holding tensors (Rademacher z: the same float32 values
    on every backend); returns (name, tensor, bitwise) per result, bitwise False where the reference's float32
    math may differ by an ulp (its CPU sqrt; its BLAS)."""
    to = dict(device=device)
    results = []

    params = [with_nans(dtype).to(**to), with_nans(dtype, 37, shift=3).to(**to)]
    backend.perturb(params, [1, 2], SEED, 0.5, RADEMACHER)
    results += [("perturb", params[0], True), ("perturb", params[1], True)]

    params = [with_nans(dtype).to(**to)]
    backend.fused_step(params, [1], SEED, 0.5, 0.1, 2.0, [0.01], NEXT, 0.25, RADEMACHER)
    results.append(("fused_step", params[0], True))

    params = [with_nans(dtype).to(**to)]
    masks, thresholds = new_masks(params), torch.ones(1, **to)
    backend.masked_perturb(params, masks, thresholds, [1], SEED, 0.5, True, RADEMACHER)
    results.append(("masked_perturb", params[0], True))
    backend.masked_fused_step(params, masks, thresholds, [1], SEED, 0.5, 0.1, 2.0, [0.01], NEXT, 0.25, RADEMACHER)
    results.append(("masked_fused_step", params[0], True))

    params, hessians = [with_nans(dtype).to(**to)], [torch.linspace(0.5, 2.0, 64, **to)]
    backend.hessian_perturb(params, hessians, [1], SEED, 0.5, RADEMACHER)
    results.append(("hessian_perturb", params[0], False))
    backend.hessian_step(params, hessians, [1], SEED, 0.5, 0.1, 2.0, 1.5, 0.1, [0.01], NEXT, 0.25, RADEMACHER)
    results.append(("hessian_step", params[0], False))

    params, anchors = [with_nans(dtype).to(**to)], [with_nans(dtype, shift=7).to(**to)]
    backend.anchored_rescale(params, anchors, None, torch.tensor([1.5], **to))
    results.append(("anchored_rescale", params[0], True))

    # 48 columns: the C++ CPU kernel's bfloat16 rows go 32 columns at a time as pairs, then element by element;
    # NaNs in even and odd columns of both.
    g = torch.Generator().manual_seed(0)
    w = with_nans(dtype, 96).view(2, 48).to(**to)
    u, v = (torch.randn(rows, 3, generator=g).to(dtype).to(**to) for rows in (2, 48))
    backend.lowrank_apply([w], [u], [v], [torch.randn(3, 3, generator=g).to(**to)])
    results.append(("lowrank_apply", w, False))

    # NaN from the float32 math: an infinite weight under weight decay gives x − lr·wd·x = ∞ − ∞.
    infinite = torch.tensor([float("inf"), float("-inf"), 1.0, float("inf")], dtype=dtype, **to)
    backend.fused_step([infinite], [3], SEED, 0.5, 0.1, 2.0, [0.01], -1, 0.0, RADEMACHER)
    results.append(("fused_step of ±inf", infinite, True))
    return results


def check_nans(got, want, what):
    assert torch.equal(got.isnan().cpu(), want.isnan()), f"{what}: NaN at other places than the reference's"
    assert (bits(got)[got.isnan().cpu()] == CANONICAL_NAN).all(), \
        f"{what}: NaNs stored as {sorted({hex(b) for b in bits(got)[got.isnan().cpu()].tolist()})}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,device", PAIRS)
def test_every_stored_nan_is_canonical(name, device, dtype):
    got = run_ops(backend_kernels(name, device), device, dtype)
    want = run_ops(backend_kernels("reference", "cpu"), "cpu", dtype)
    for (what, g, bitwise), (_, w, _) in zip(got, want):
        assert w.isnan().any(), what  # the case holds NaNs at all
        check_nans(g, w, what)
        if bitwise:
            assert torch.equal(bits(g), bits(w)), what


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,device", PAIRS)
def test_nan_from_overflow_is_canonical(name, device, dtype):
    """±huge·z overflows float32 where |z| > 1.13 (normal z); taking it back gives ∞ − ∞ there."""
    def run(backend, device):
        p = torch.linspace(-1, 1, 256, dtype=dtype, device=device)
        for scale in (3e38, -3e38):
            backend.perturb([p], [5], SEED, scale, NORMAL)
        return p

    got, want = run(backend_kernels(name, device), device), run(backend_kernels("reference", "cpu"), "cpu")
    assert want.isnan().sum() > 10
    check_nans(got, want, "perturb ±3e38")
