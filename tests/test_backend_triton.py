"""Tests specific to the Triton kernels: the bit-exact stream, the fp32 update math, the bf16 rounding helper,
independence from launch geometry and grouping, and one launch per dtype. Cross-backend op tests live elsewhere.

On CPU these need the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""
from __future__ import annotations

import pytest
import torch

from conftest import philox_words
from zokern.random import MASK32, philox4x32, reference_draw

tb = pytest.importorskip("zokern.backends.triton")

DEVICES = [d for d in ("cpu", "cuda") if tb.availability(d)[0]]
if not DEVICES:
    pytest.skip(f"Triton backend unavailable: cpu: {tb.availability('cpu')[1]}; "
                f"cuda: {tb.availability('cuda')[1]}", allow_module_level=True)

from zokern import kernels  # noqa: E402  (only importable where triton is)
from zokern.kernels import multi_tensor  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SEEDS = [0, 0xFFFFFFFF, (1 << 63) - 1, 0x0123456789ABCDEF]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want| in float32 ulps of want."""
    want = want.cpu()
    spacing = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
    return (got.cpu().double() - want.double()).abs() / spacing.double()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN matches any NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and torch.equal(a.isnan(), b.isnan())


def _params(device, shapes, dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dt) for s in shapes for dt in dtypes]


def _streams(n):
    return [(i * 2654435761 + 12345) & MASK32 for i in range(n)]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_match_reference(device, seed):
    stream, domain = 0xFFFFFFFF, 5
    for first in (0, 7, (1 << 32) - 100, (1 << 40) + 3):  # the second-to-last crosses into c1 = 1
        got = philox_words(seed, stream, domain, first, 257, device, "triton")
        j = torch.arange(first, first + 257, dtype=torch.int64)
        want = torch.stack(philox4x32((j & MASK32, j >> 32, stream, domain), (seed & MASK32, seed >> 32)), -1)
        assert torch.equal(got.cpu(), want), (seed, first)


@pytest.mark.parametrize("offset", [0, 1, 3, (1 << 31) + 5])
@pytest.mark.parametrize("dist", [0, 1])
def test_fill_random_matches_reference(device, offset, dist):
    for seed, stream in ((0, 0), ((1 << 63) - 1, 0xFFFFFFFF), (0x0123456789ABCDEF, 77)):
        out = torch.empty(30001, device=device)  # not a multiple of 4
        tb.fill_random(out, seed, stream, offset, 0, dist)
        want = reference_draw(seed, stream, out.numel(), offset, 0, dist)
        if dist == 1:
            assert torch.equal(out.cpu(), want)
        else:
            assert _ulps(out, want).max().item() <= 4.0


def _z(seed, stream, p, dist):
    out = torch.empty(p.numel(), device=p.device)
    tb.fill_random(out, seed, stream, 0, 0, dist)
    return out.view(p.shape)


@pytest.mark.parametrize("dist", [0, 1])
def test_update_math_is_ops_md_on_own_stream(device, dist):
    """Given the backend's own z, perturb and fused_step are docs/OPS.md to the bit: float32 operations in
    the written order (no FMA), round to nearest even into bf16/fp16."""
    params = _params(device, [(1,), (3,), (5, 7), (4099,)], [torch.float32, torch.bfloat16, torch.float16])
    streams = _streams(len(params))
    wds = [0.0 if i % 3 else 0.05 for i in range(len(params))]
    seed, next_seed = 0xDEADBEEFCAFE, (1 << 40) + 3

    got = [p.clone() for p in params]
    tb.perturb(got, streams, seed, 1e-3, dist)
    want = [(p.float() + 1e-3 * _z(seed, s, p, dist)).to(p.dtype) for p, s in zip(params, streams)]
    assert all(_same(a, b) for a, b in zip(got, want))

    for nxt in (-1, next_seed):
        got = [p.clone() for p in params]
        tb.fused_step(got, streams, seed, 1e-3, 1e-2, -2.5, wds, nxt, 2e-3, dist)
        for p, s, wd, g in zip(params, streams, wds, got):
            z = _z(seed, s, p, dist)
            x = p.float() + 1e-3 * z
            x = x - 1e-2 * (-2.5 * z + wd * x)
            if nxt >= 0:
                x = x + 2e-3 * _z(nxt, s, p, dist)
            assert _same(g, x.to(p.dtype)), (p.dtype, p.shape, nxt)


@triton.jit
def _bf16_round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, kernels.mezo._bf16_bits_rne(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_bf16_rounding_is_nearest_even(device):
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(1 << 31), 1 << 31, (20000,), generator=gen, dtype=torch.int64)
    ties = (torch.randint(0, 1 << 16, (2000,), generator=gen, dtype=torch.int64) << 16) | 0x8000
    specials = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                             0xFFFFFFFF, 0x00008000, 0x00018000, 0x80000000, 0x00000001, 0x3F808000])
    x = torch.cat([bits, ties, specials]).to(torch.int64)
    x = torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32).view(torch.float32).to(device)
    out = torch.empty(x.numel(), dtype=torch.int16, device=device)
    _bf16_round_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)
    assert _same(out.view(torch.bfloat16).cpu(), x.cpu().to(torch.bfloat16))
    assert (out[x.isnan()] == 0x7FFF).all()  # every NaN the canonical one (docs/OPS.md)


def _run(op, params, streams, dist, **sizes):
    if op == "perturb":
        tb.perturb(params, streams, 987654321987, 1e-2, dist, **sizes)
    else:
        wds = [0.01 * (s % 3) for s in streams]
        tb.fused_step(params, streams, 987654321987, 1e-2, 1e-3, 0.7, wds, 42, 1e-2, dist, **sizes)


@pytest.mark.parametrize("op", ["perturb", "fused_step"])
def test_independent_of_block_chunk_grouping_and_order(device, op):
    dist = 0
    # Sizes that are not multiples of 4 and chunks that split them unevenly; few programs, because each
    # costs tens of milliseconds in the interpreter.
    params = _params(device, [(0,), (3,), (37,), (10, 13)], [torch.float32, torch.bfloat16, torch.float16],
                     seed=2)
    streams = _streams(len(params))

    base = [p.clone() for p in params]
    _run(op, base, streams, dist)
    for block, chunk in ((16, 36), (4, 52), (1024, 4096)):
        got = [p.clone() for p in params]
        _run(op, got, streams, dist, block=block, chunk=chunk)
        assert all(torch.equal(a, b) for a, b in zip(got, base)), (block, chunk)

    got = [p.clone() for p in params]
    for p, s in zip(got, streams):  # one call per tensor
        _run(op, [p], [s], dist)
    assert all(torch.equal(a, b) for a, b in zip(got, base))

    order = list(reversed(range(len(params))))
    got = [params[i].clone() for i in order]
    _run(op, got, [streams[i] for i in order], dist)
    assert all(torch.equal(got[k], base[i]) for k, i in enumerate(order))


def test_one_launch_per_dtype(device, launches):
    params = _params(device, [(i % 7 + 1, 3) for i in range(25)], [torch.float32, torch.bfloat16])
    params.append(torch.empty(0, device=device, dtype=torch.float16))  # empty tensors launch nothing
    streams = _streams(len(params))
    tb.perturb(params, streams, 1, 1e-3, 0)
    assert launches.kernels == {"zo_update_kernel": 2}
    tb.fused_step(params, streams, 1, 1e-3, 1e-3, 1.0, [0.0] * len(params), 2, 1e-3, 1)
    assert launches.kernels == {"zo_update_kernel": 4}


def test_element_indices_beyond_2_31(device):
    """Drives the kernel on elements [K, K + n) of a virtual tensor with K > 2^32, backed by n real elements:
    the table row points K elements before the buffer and its first chunk index is −K/chunk."""
    chunk, n, k = 4096, 10000, 3 << 31
    p = torch.randn(n, device=device)
    seed, stream, scale = 2**62 + 5, 0xABCDEF01, 0.5
    got = p.clone()
    tensors = torch.tensor([[got.data_ptr() - 4 * k, k + n, stream, -(k // chunk), 0]], dtype=torch.int64,
                           device=device)
    chunks = torch.zeros(triton.cdiv(n, chunk), dtype=torch.int32, device=device)
    k0, k1 = multi_tensor.seed_words(seed)
    kernels.zo_update_kernel[(chunks.numel(),)](
        tensors, chunks, tensors, chunk, k0, k1, scale, 0.0, 0.0, 0, 0, 0.0, DTYPE=kernels.FLOAT32.value,
        DIST=0, FUSED=False, HAS_NEXT=False, STOCHASTIC=False, ALIGNED_PTRS=False,
        ALIGNED_ENDS=False, BLOCK=1024, **multi_tensor.launch_options())
    z = torch.empty(n, device=device)
    tb.fill_random(z, seed, stream, k, 0, 0)
    assert _ulps(z, reference_draw(seed, stream, n, k)).max().item() <= 4.0
    assert torch.equal(got, p + scale * z)
