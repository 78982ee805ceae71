"""MeZO's ops, perturb_ and fused_step_ (docs/OPS.md), on every backend: bit for bit the reference's float32
composition over dtypes and awkward shapes, one launch per dtype, invariant to chunking, grouping and order, 16-bit
stores rounded to nearest even over every 16-bit value, opcheck, and bad input rejected before any write."""
import pytest
import torch
from conftest import backend_kernels
from op_cases import (BACKENDS, CHUNKINGS, DTYPE_CASES, DTYPE_IDS, NEXT_SEED, NORMAL, RADEMACHER, SEED,
                      assert_bitwise, assert_launches, assert_margins_untouched, awkward_params, backends_named, bits,
                      clones, dtype_count, margins, reference_on_backend_z, stream_ids)

import zokern
from zokern.random import reference_draw

try:  # the Triton kernels' own helpers, where triton is installed
    import triton
    import triton.language as tl

    from zokern import kernels
    from zokern.kernels import multi_tensor
except ImportError:
    triton = None

SCALE = 0.37
STEP = dict(restore=0.25, lr=0.1, grad=-1.5, next_scale=0.2)
# (op, distribution, next_seed): the perturbation, and the fused step with and without the next perturbation.
VARIANTS = {"perturb-normal": ("perturb_", NORMAL, None), "perturb-rademacher": ("perturb_", RADEMACHER, None),
            "step-next-normal": ("fused_step_", NORMAL, NEXT_SEED),
            "step-rademacher": ("fused_step_", RADEMACHER, None),
            "perturb-rademacher-bit": ("perturb_", "rademacher_bit", None),
            "step-next-rademacher-bit": ("fused_step_", "rademacher_bit", NEXT_SEED)}
# Every dtype case with Gaussian and one-bit z; the 32-bit Rademacher draws (exact on every backend) in the mixed
# call.
CASES = [pytest.param(case, variant, id=f"{variant}-{name}") for case, name in zip(DTYPE_CASES, DTYPE_IDS)
         for variant in VARIANTS if name == "mixed" or "normal" in variant or "bit" in variant]


def decays(ids):
    """Per-tensor weight decays keyed by stream id (they follow their tensor when the list is reordered), some 0."""
    return [0.1 * (k % 3) for k in ids]


def run(op, params, backend, dist=NORMAL, next_seed=NEXT_SEED, ids=None):
    ids = stream_ids(len(params)) if ids is None else ids
    if op == "perturb_":
        zokern.perturb_(params, SEED, SCALE, stream_ids=ids, dist=dist, backend=backend)
    else:
        zokern.fused_step_(params, SEED, stream_ids=ids, weight_decay=decays(ids), next_seed=next_seed, dist=dist,
                           backend=backend, **STEP)


def run_fused_step_kernel(kernel, params, ids, dist, sizes):
    """The backend's fused step kernel called directly with chunk sizes (contiguous tensors, no checks)."""
    kernel.fused_step(params, ids, SEED, STEP["restore"], STEP["lr"], STEP["grad"], decays(ids), NEXT_SEED,
                      STEP["next_scale"], dist, **sizes)


# --- the math ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case,variant", CASES)
def test_matches_reference_bitwise(backend, device, case, variant, monkeypatch, launches):
    """Every tensor of the call, whatever its layout, gets the reference's bits on the backend's own z, in one
    call into the dispatch table (one Triton launch per dtype), and nothing outside a view is written."""
    op, dist, next_seed = VARIANTS[variant]
    params = awkward_params(case, device)
    outside = margins(params)
    reference_on_backend_z(monkeypatch, backend, device)
    want = clones(params, "cpu")
    run(op, want, "reference", dist, next_seed)
    launches.clear()
    run(op, params, backend, dist, next_seed)
    assert_launches(launches, backend, op, {"mezo_kernel": dtype_count(params)})
    assert_bitwise(params, want, variant)
    assert_margins_untouched(params, outside)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["perturb-normal", "perturb-rademacher-bit", "step-next-rademacher-bit"])
@pytest.mark.parametrize("offset", [0, 296], ids=["from-0", "offset-296"])
def test_matches_reference_bitwise_at_offsets(backend, device, dtype, variant, offset, monkeypatch):
    """Tensors longer than the C++ kernels' 256-element blocks, whose stream starts on a Philox call's 128 one-bit
    signs (offset 0) or between them (296: whole blocks that begin inside a call), bit for bit the reference's."""
    op, dist, next_seed = VARIANTS[variant]
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(1031, generator=g).to(dtype=dtype, device=device),
              torch.randn(40, 33, generator=g).to(dtype=dtype, device=device)]
    reference_on_backend_z(monkeypatch, backend, device)
    ids, offsets = [4, 9], [offset, offset + 8]
    want = clones(params, "cpu")
    for tensors, name in ((want, "reference"), (params, backend)):
        kw = dict(stream_ids=ids, offsets=offsets, dist=dist, backend=name)
        if op == "perturb_":
            zokern.perturb_(tensors, SEED, SCALE, **kw)
        else:
            zokern.fused_step_(tensors, SEED, weight_decay=decays(ids), next_seed=next_seed, **kw, **STEP)
    assert_bitwise(params, want, variant)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_step_equals_mezo_composition(backend, device):
    """One fused pass equals MeZO's separate restore, update and next perturbation (fp32)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 33, generator=g).to(device), torch.randn(17, generator=g).to(device)]
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


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_tensor_weight_decay(backend, device):
    """A list of weight decays applies one per tensor; 0 switches decay off for a tensor."""
    params = [torch.randn(10, device=device), torch.randn(10, device=device)]
    off = clones(params)
    zokern.fused_step_(params, 3, stream_ids=[0, 1], restore=0.0, lr=0.1, grad=0.0, weight_decay=[0.5, 0.0],
                       backend=backend)
    torch.testing.assert_close(params[0], off[0] * (1 - 0.05))
    assert torch.equal(params[1], off[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", [NORMAL, RADEMACHER], ids=["normal", "rademacher"])
def test_invariant_to_chunking_grouping_and_order(backend, device, dist):
    """The fused step with a next perturbation (perturb_'s chunk tables and groups are the same code)."""
    params = awkward_params("mixed", device, seed=1)
    ids = stream_ids(len(params))
    base = clones(params)
    run("fused_step_", base, backend, dist)
    kernel = backend_kernels(backend, device)
    for sizes in CHUNKINGS[backend]:
        got = [p.contiguous() for p in clones(params)]
        run_fused_step_kernel(kernel, got, ids, dist, sizes)
        assert_bitwise(got, base, f"chunks {sizes}")
    got = clones(params)
    for p, k in zip(got, ids):
        run("fused_step_", [p], backend, dist, ids=[k])
    assert_bitwise(got, base, "one call per tensor")
    got = clones(params)
    run("fused_step_", got[::-1], backend, dist, ids=ids[::-1])
    assert_bitwise(got, base, "reversed order")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_tensors_one_launch_per_dtype(backend, device, launches):
    """A model-sized list of tensors is one call into the backend and one Triton launch per dtype; empty tensors
    launch nothing."""
    params = [torch.randn(i % 7 + 1, 3, device=device) for i in range(16)] + \
        [torch.randn(i % 5 + 2, device=device).bfloat16() for i in range(16)] + \
        [torch.empty(0, device=device, dtype=torch.float16)]
    run("perturb_", params, backend)
    assert_launches(launches, backend, "perturb_", {"mezo_kernel": 2})
    launches.clear()
    run("perturb_", params[-1:], backend)
    assert launches.calls == {} and launches.kernels == {}


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [pair for pair in backends_named("cpp", "triton", "cuda")
                                            if pair.values[1] == "cuda" or pair.values[0] == "cpp"])
def test_more_than_2_pow_24_elements(backend, device):
    """Compiled kernels only: the interpreter takes minutes here, and test_triton_element_indices_beyond_2_31
    drives its index arithmetic past 2^32 on a few elements."""
    n = (1 << 24) + 3
    p = torch.zeros(n, device=device)
    zokern.perturb_([p], 99, 1.0, stream_ids=[1], backend=backend)
    tail = reference_draw(99, 1, 1000, offset=n - 1000)
    torch.testing.assert_close(p[-1000:].cpu(), tail, rtol=2e-6, atol=2e-6)
    head = reference_draw(99, 1, 1000)
    torch.testing.assert_close(p[:1000].cpu(), head, rtol=2e-6, atol=2e-6)


# --- 16-bit stores ------------------------------------------------------------------------------------------------

# Scales that, added to every 16-bit value, hit ties, subnormals, overflow and the float32 subnormals.
SCALES = {torch.float16: [0.0, 2.0**-25, 3 * 2.0**-26, 2.0**-24, 2.0**-14, 2.0**-11, 0.5, 16.0 + 2.0**-6, 2.0**15,
                          1e-30],
          torch.bfloat16: [0.0, 2.0**-8, 3 * 2.0**-10, 1.0, 2.0**-133, 1e-40, 3e38, 2.0**120]}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy, on the infinities made here
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_store_rounding_over_all_16_bit_values(backend, device, dtype):
    """x + scale·z (±1) for every 16-bit x is torch's float32 sum rounded to nearest even, NaN stored as 0x7FFF.
    The kernel is called directly: the op refuses the scales whose product with a Gaussian z could overflow."""
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    if backend == "triton" and device == "cpu":
        x = x[::3]  # every third value keeps both mantissa parities (ties) in a third of the interpreter's time
    z = zokern.draw(SEED, 4, x.numel(), dist="rademacher", device=device, backend=backend).cpu()
    kernel = backend_kernels(backend, device)
    for scale in SCALES[dtype]:
        p = x.clone().to(device)
        kernel.perturb([p], [4], SEED, scale, RADEMACHER)
        expected = (x.float() + scale * z).to(dtype)
        nan = expected.isnan()
        assert torch.equal(p.isnan().cpu(), nan), f"scale={scale}"
        assert torch.equal(bits(p)[~nan], bits(expected)[~nan]), f"scale={scale}"
        assert (bits(p)[nan] == 0x7FFF).all(), f"scale={scale}"  # the canonical NaN the GPU's conversions produce


if triton is not None:
    @triton.jit
    def _bf16_round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, kernels.mezo._bf16_bits_rne(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@pytest.mark.parametrize("backend,device", backends_named("triton"))
def test_triton_bf16_rounding_is_nearest_even(backend, device):
    """The Triton kernels' float32 → bfloat16 rounding on random bit patterns, ties, infinities and NaNs."""
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randint(-(1 << 31), 1 << 31, (20000,), generator=gen, dtype=torch.int64)
    ties = (torch.randint(0, 1 << 16, (2000,), generator=gen, dtype=torch.int64) << 16) | 0x8000
    specials = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                             0xFFFFFFFF, 0x00008000, 0x00018000, 0x80000000, 0x00000001, 0x3F808000])
    x = torch.cat([pattern, ties, specials])
    x = torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32).view(torch.float32).to(device)
    out = torch.empty(x.numel(), dtype=torch.int16, device=device)
    _bf16_round_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)
    nan = x.isnan().cpu()
    assert torch.equal(out.cpu()[~nan], bits(x.cpu().to(torch.bfloat16))[~nan])
    assert (out.cpu()[nan] == 0x7FFF).all()  # every NaN the canonical one (docs/OPS.md)


@pytest.mark.parametrize("backend,device", backends_named("triton"))
def test_triton_element_indices_beyond_2_31(backend, device):
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
    kernels.mezo_kernel[(chunks.numel(),)](
        tensors, chunks, tensors, chunk, k0, k1, scale, 0.0, 0.0, 0, 0, 0.0, DTYPE=kernels.FLOAT32.value,
        DIST=0, FUSED=False, HAS_NEXT=False, STOCHASTIC=False, ALIGNED_PTRS=False,
        ALIGNED_ENDS=False, BLOCK=1024, **multi_tensor.launch_options())
    z = zokern.draw(seed, stream, n, offset=k, device=device, backend=backend)
    assert torch.equal(got, p + scale * z)


# --- the registered ops -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["perturb_", "fused_step_"])
def test_opcheck(backend, device, op):
    params = awkward_params("mixed", device)[1:4]  # the three dtypes, a transposed view
    ids = stream_ids(len(params))
    args = {"perturb_": (params, ids, SEED, SCALE, NORMAL, backend),
            "fused_step_": (params, ids, SEED, 0.25, 0.1, -1.5, decays(ids), NEXT_SEED, 0.2, NORMAL, backend)}[op]
    torch.library.opcheck(getattr(torch.ops.zokern, op), args)


META = torch.empty(4, device="meta")


@pytest.mark.parametrize("op,args", [
    ("perturb_", ([META, META[1:]], [0, 1], 1, 0.5, 0)),
    ("perturb_", ([META], [1 << 32], 1, 0.5, 0)),
    ("fused_step_", ([META], [0], 1, 0.0, 1e39, 1.0, [0.0], -1, 0.0, 0)),
    ("fused_step_", ([META], [0], 1, 0.0, 1e-3, 1.0, [0.0], 2, -1e38, 0)),
], ids=["aliasing", "stream id", "lr", "next scale"])
def test_fakes_run_the_same_checks(op, args):
    """Meta tensors (as under tracing) go to the fake implementations: they reject what the device
    implementations reject."""
    with pytest.raises((ValueError, TypeError)):
        getattr(torch.ops.zokern, op)(*args, "")


# --- input checks that hold on every backend: they run before any tensor is written ------------------------------

def _unchanged(tensors, before):
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("views", [lambda x: [x[0:6], x[2:8]], lambda x: [x[2:8], x.view(2, 4)],
                                   lambda x: [x.view(2, 4).t(), x[3:4]], lambda x: [x[::2], x[2::4]],
                                   lambda x: [x[0:4], x[3:8]], lambda x: [x[3:8], x[7:8]]],
                         ids=["shifted slices", "slice and whole", "transpose and element", "nested strides",
                              "one common element", "last element"])
def test_overlapping_views_are_rejected(backend, device, views):
    """Aliasing is overlap of the bytes each view can touch in one storage, not equal data pointers."""
    x = torch.randn(8, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match=r"params\[\d\] and params\[\d\] share memory"):
        zokern.perturb_(views(x), 1, 1.0, stream_ids=[0, 1], backend=backend)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adjacent_slices_are_accepted(backend, device):
    """x[0:4] and x[4:8] meet at a boundary without a common byte."""
    x = torch.randn(8, device=device)
    expected = [x[0:4].clone(), x[4:8].clone()]
    zokern.perturb_(expected, 3, 0.5, stream_ids=[0, 1], backend=backend)
    zokern.perturb_([x[0:4], x[4:8]], 3, 0.5, stream_ids=[0, 1], backend=backend)
    assert torch.equal(x[0:4], expected[0]) and torch.equal(x[4:8], expected[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_interleaved_views_are_accepted(backend, device):
    """x[::2] and x[1::2] share a storage and a byte range but no element: they are two tensors."""
    x = torch.randn(4, 6, device=device)
    expected = [x[:, ::2].clone(), x[:, 1::2].clone()]
    zokern.perturb_(expected, 3, 0.5, stream_ids=[0, 1], backend=backend)
    zokern.perturb_([x[:, ::2], x[:, 1::2]], 3, 0.5, stream_ids=[0, 1], backend=backend)
    assert torch.equal(x[:, ::2], expected[0]) and torch.equal(x[:, 1::2], expected[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_tensor_is_rejected_before_any_write(backend, device):
    """A stride-0 view cannot take a write-back; it is rejected before the tensors ahead of it are written."""
    params = [torch.randn(5, device=device), torch.randn(3, device=device).expand(4, 3)]
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"params\[1\] addresses some elements more than once"):
        zokern.perturb_(params, 1, 1.0, stream_ids=[0, 1], backend=backend)
    with pytest.raises(ValueError, match=r"params\[1\] addresses some elements more than once"):
        zokern.fused_step_(params, 1, stream_ids=[0, 1], restore=0.1, lr=0.1, grad=1.0, backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] addresses some elements more than once"):
        zokern.fill_random_(torch.zeros(1, device=device).expand(4), 1, 0, backend=backend)
    assert _unchanged(params, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("call,message", [
    (lambda ps, b: zokern.perturb_(ps, 1, 1e39, stream_ids=[0, 1], backend=b), "scale must be finite in float32"),
    (lambda ps, b: zokern.perturb_(ps, 1, -1e38, stream_ids=[0, 1], backend=b), r"scale \* z overflows float32"),
    (lambda ps, b: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1e39, grad=1.0, backend=b),
     "lr must be finite in float32"),
    (lambda ps, b: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1e30, grad=1e10, backend=b),
     r"lr \* grad \* z overflows float32"),
    (lambda ps, b: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=0.0, lr=1e-3, grad=1.0,
                                      weight_decay=[0.0, 10**400], backend=b), r"weight_decay\[1\] must be finite"),
    (lambda ps, b: zokern.perturb_(ps, 1, 2**200, stream_ids=[0, 1], backend=b), "scale must be finite in float32"),
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
