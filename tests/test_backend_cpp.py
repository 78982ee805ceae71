"""C++ backends specifically: the CPU extension against the reference stream, its invariances (chunking,
grouping, order), its bf16/fp16 rounding, and the CUDA extension against the CPU one. The generic
cross-backend tests (ops vs reference, opcheck, bad input) are in test_ops.py and test_random.py."""
import pytest
import torch

from conftest import backend_kernels, philox_words, ulp_distance
from zokern import backends
from zokern.backends import _build, _extension
from zokern.random import Domain, philox4x32, reference_draw

CPU_OK, CPU_WHY = backends.availability("cpp", "cpu")
cpp_cpu = backend_kernels("cpp", "cpu")
pytestmark = pytest.mark.skipif(not CPU_OK, reason=f"cpp backend unavailable: {CPU_WHY}")

SEED = 0x5EED_0123_4567_89AB  # uses both key words
NORMAL, RADEMACHER = 0, 1
LOW = [torch.bfloat16, torch.float16]
# Shapes around the Philox call (4), the CUDA step (8) and chunk edges; one tensor spans several chunks
# of the default size (2^16).
SHAPES = [(0,), (1,), (3,), (5,), (8,), (9, 3), (4099,), (70001,)]


def words_reference(seed, stream, domain, first_call, n):
    j = torch.arange(first_call, first_call + n, dtype=torch.int64)
    return torch.stack(philox4x32((j & 0xFFFFFFFF, j >> 32, stream, domain), (seed & 0xFFFFFFFF, seed >> 32)), 1)


def mixed_params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    return [torch.randn(s, generator=g).to(dtypes[i % 3]).to(device) for i, s in enumerate(SHAPES)]


def run_op(backend, op, params, streams, dist, chunk=None):
    kw = {} if chunk is None else {"chunk": chunk}  # the reference backend has no chunks
    if op == "perturb":
        backend.perturb(params, streams, SEED, 0.37, dist, **kw)
    elif op == "step":
        wds = [0.1 * (k % 3) for k in streams]  # keyed by stream, so they follow their tensors when reordered
        backend.fused_step(params, streams, SEED, 1e-3, 1e-2, -3.5, wds, 77, 1e-3, dist, **kw)
    else:  # fused step without the next perturbation
        backend.fused_step(params, streams, SEED, 0.5, 0.25, 2.0, [0.05] * len(params), -1, 0.0, dist, **kw)


OPS = ["perturb", "step", "step_no_next"]


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


# --- the random stream ------------------------------------------------------------------------------

@pytest.mark.parametrize("first_call", [0, 12345, (1 << 32) - 3, 1 << 32, (1 << 40) + 7, (1 << 60) - 1000])
def test_philox_words_bitwise(first_call):
    for seed, stream, domain in [(SEED, 0xFFFFFFFF, Domain.SUBSPACE_V), (0, 0, 0), ((1 << 63) - 1, 7, 0xFFFFFFFF)]:
        got = philox_words(seed, stream, domain, first_call, 1000, "cpu", "cpp")
        assert got.dtype == torch.int64 and got.shape == (1000, 4)
        assert torch.equal(got, words_reference(seed, stream, int(domain), first_call, 1000))


def test_philox_known_answer():
    # Random123's philox4x32-10 vector for counter 0, key 0.
    assert philox_words(0, 0, 0, 0, 1, "cpu", "cpp").tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]]


@pytest.mark.parametrize("offset", [0, 1, 3, (1 << 31) + 5])
def test_fill_random_matches_reference(offset):
    n = (1 << 17) + 3  # several OpenMP chunks
    for domain in (Domain.PERTURBATION, Domain.CORE):
        out = torch.empty(n)
        cpp_cpu.fill_random(out, SEED, 3, offset, domain, NORMAL)
        ulps = ulp_distance(out, reference_draw(SEED, 3, n, offset, domain))
        assert ulps.max() <= 4, f"max {ulps.max().item()} ulps"  # float64 Box–Muller vs torch float32: 3 observed
        cpp_cpu.fill_random(out, SEED, 3, offset, domain, RADEMACHER)
        assert torch.equal(out, reference_draw(SEED, 3, n, offset, domain, dist=RADEMACHER))


def test_fill_random_windows_are_one_stream():
    whole = torch.empty((1 << 17) + 40)
    cpp_cpu.fill_random(whole, SEED, 9, 0, 0, NORMAL)
    for offset in (1, 3, 6, 65535):
        part = torch.empty(1 << 16)
        cpp_cpu.fill_random(part, SEED, 9, offset, 0, NORMAL)
        assert torch.equal(part, whole[offset:offset + part.numel()])


def test_perturb_adds_the_filled_stream():
    """The fused ops use bit for bit the values fill_random writes (the public `draw`)."""
    p = torch.zeros(70001)
    cpp_cpu.perturb([p], [11], SEED, 1.0, NORMAL)
    z = torch.empty_like(p)
    cpp_cpu.fill_random(z, SEED, 11, 0, Domain.PERTURBATION, NORMAL)
    assert torch.equal(p, z)


# --- invariances ------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dist", [NORMAL, RADEMACHER])
def test_invariant_to_chunking_grouping_and_order(op, dist):
    streams = [100 + k for k in range(len(SHAPES))]
    base = mixed_params()
    run_op(cpp_cpu, op, base, streams, dist)
    for chunk in (1, 3, 8, 1000, 1 << 20):
        params = mixed_params()
        run_op(cpp_cpu, op, params, streams, dist, chunk=chunk)
        assert all(torch.equal(a, b) for a, b in zip(params, base)), f"chunk={chunk}"
    params = mixed_params()
    for k, p in enumerate(params):
        run_op(cpp_cpu, op, [p], [streams[k]], dist)
    assert all(torch.equal(a, b) for a, b in zip(params, base)), "one call per tensor"
    params = mixed_params()
    run_op(cpp_cpu, op, params[::-1], streams[::-1], dist)
    assert all(torch.equal(a, b) for a, b in zip(params, base)), "reversed order"


# --- float32 arithmetic and bf16/fp16 stores ----------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_store_is_rne_of_float32_result(op, dtype):
    g = torch.Generator().manual_seed(1)
    narrow = (torch.randn(50000, generator=g) * 3).to(dtype)
    wide = narrow.float()
    run_op(cpp_cpu, op, [narrow], [5], NORMAL)
    run_op(cpp_cpu, op, [wide], [5], NORMAL)
    assert torch.equal(bits(narrow), bits(wide.to(dtype)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
def test_rademacher_equals_reference_bitwise(op, dtype):
    """With exact ±1 draws, the element math is the reference's float32 composition bit for bit (no FMA)."""
    from zokern.backends import reference

    params = [(torch.randn(4099) * 10).to(dtype)]
    expected = [params[0].clone()]
    run_op(cpp_cpu, op, params, [3], RADEMACHER)
    run_op(reference, op, expected, [3], RADEMACHER)
    assert torch.equal(bits(params[0]), bits(expected[0]))


# Scales that, added to every 16-bit value, hit ties, subnormals, overflow and the float32 subnormals.
SCALES = {torch.float16: [0.0, 2.0**-25, 3 * 2.0**-26, 2.0**-24, 2.0**-14, 2.0**-11, 0.5, 16.0 + 2.0**-6, 2.0**15, 1e-30],
          torch.bfloat16: [0.0, 2.0**-8, 3 * 2.0**-10, 1.0, 2.0**-133, 1e-40, 3e38, 2.0**120]}


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_store_rounding_over_all_16_bit_values(dtype):
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    z = torch.empty(x.numel())
    cpp_cpu.fill_random(z, SEED, 4, 0, Domain.PERTURBATION, RADEMACHER)
    for scale in SCALES[dtype]:
        p = x.clone()
        cpp_cpu.perturb([p], [4], SEED, scale, RADEMACHER)
        expected = (x.float() + scale * z).to(dtype)  # torch's float32 ops and RNE conversion
        nan = expected.isnan()
        assert torch.equal(p.isnan(), nan)
        assert torch.equal(bits(p)[~nan], bits(expected)[~nan]), f"scale={scale}"
        assert (bits(p)[nan] == 0x7FFF).all()  # the canonical NaN the GPU's conversions produce


# --- build failures ---------------------------------------------------------------------------------

def test_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("int f( {\n")
    monkeypatch.setattr(_extension, "source_dir", lambda: tmp_path)
    monkeypatch.setenv("ZOKERN_BUILD_DIR", str(tmp_path / "build"))
    broken = _build.ExtensionSource("zokern_broken_test", ("broken.cpp",), cuda=False)
    with pytest.warns(RuntimeWarning, match="installed without its compiled CPU extension: compiling"):
        ok, why = _extension._Extension(broken, library_dir=tmp_path).ensure()
    assert not ok and "error" in why, why


# --- CUDA against CPU -------------------------------------------------------------------------------

def cuda_test(f):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(f))


CLOSE = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
         torch.float16: dict(rtol=1e-3, atol=2e-3)}


@pytest.fixture
def gpu_backend():
    ok, why = backends.availability("cuda", "cuda")
    assert ok, why  # on a CUDA machine the extension must build
    return backend_kernels("cuda", "cuda")


@cuda_test
@pytest.mark.parametrize("offset", [0, 1, 3, (1 << 31) + 5])
def test_cuda_stream_matches_cpu(gpu_backend, offset):
    for first_call in (0, (1 << 32) - 3, (1 << 40) + 7):
        assert torch.equal(philox_words(SEED, 9, 2, first_call + offset, 1000, "cuda", "cuda").cpu(),
                           philox_words(SEED, 9, 2, first_call + offset, 1000, "cpu", "cpp"))
    n = (1 << 17) + 3
    cpu, gpu = torch.empty(n), torch.empty(n, device="cuda")
    gpu_backend.fill_random(gpu, SEED, 3, offset, 0, NORMAL)
    assert ulp_distance(gpu.cpu(), reference_draw(SEED, 3, n, offset)).max() <= 4
    cpp_cpu.fill_random(cpu, SEED, 3, offset, 0, RADEMACHER)
    gpu_backend.fill_random(gpu, SEED, 3, offset, 0, RADEMACHER)
    assert torch.equal(gpu.cpu(), cpu)


@cuda_test
@pytest.mark.parametrize("op", OPS)
def test_cuda_ops_match_cpu(gpu_backend, op):
    streams = [100 + k for k in range(len(SHAPES))]
    # Rademacher: the same float32 composition and conversions, so CPU and GPU agree bit for bit, for
    # every chunking (ragged chunk edges take the element-wise path) and order.
    cpu = mixed_params()
    run_op(cpp_cpu, op, cpu, streams, RADEMACHER)
    for chunk in (None, 1, 7, 8, 1000):
        gpu = mixed_params(device="cuda")
        run_op(gpu_backend, op, gpu, streams, RADEMACHER, chunk=chunk)
        assert all(torch.equal(bits(a.cpu()), bits(b)) for a, b in zip(gpu, cpu)), f"chunk={chunk}"
    gpu = mixed_params(device="cuda")
    run_op(gpu_backend, op, gpu[::-1], streams[::-1], RADEMACHER)
    assert all(torch.equal(bits(a.cpu()), bits(b)) for a, b in zip(gpu, cpu)), "reversed"
    # Normal: z agrees with the CPU's to a few ulps, and the GPU result is invariant to chunking.
    base = mixed_params(device="cuda")
    run_op(gpu_backend, op, base, streams, NORMAL)
    for chunk in (1, 7, 1000):
        gpu = mixed_params(device="cuda")
        run_op(gpu_backend, op, gpu, streams, NORMAL, chunk=chunk)
        assert all(torch.equal(a, b) for a, b in zip(gpu, base)), f"chunk={chunk}"
    cpu = mixed_params()
    run_op(cpp_cpu, op, cpu, streams, NORMAL)
    for a, b in zip(base, cpu):
        torch.testing.assert_close(a.cpu(), b, **CLOSE[b.dtype])


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
def test_cuda_misaligned_view_takes_element_path(gpu_backend, dtype):
    storage = torch.randn(70010, device="cuda").to(dtype)
    before = storage.clone()
    view, aligned = storage[3:70003], storage[3:70003].clone()
    gpu_backend.perturb([view], [1], SEED, 0.5, NORMAL)
    gpu_backend.perturb([aligned], [1], SEED, 0.5, NORMAL)
    assert torch.equal(view, aligned)
    assert torch.equal(storage[:3], before[:3]) and torch.equal(storage[70003:], before[70003:])


@cuda_test
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cuda_stores_match_cpu_over_all_16_bit_values(gpu_backend, dtype):
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    for scale in SCALES[dtype]:
        cpu, gpu = x.clone(), x.cuda()
        cpp_cpu.perturb([cpu], [4], SEED, scale, RADEMACHER)
        gpu_backend.perturb([gpu], [4], SEED, scale, RADEMACHER)
        assert torch.equal(bits(gpu.cpu()), bits(cpu)), f"scale={scale}"  # NaNs included: both 0x7FFF


_SIMD_PROBE = """
import sys, torch, zokern
g = torch.Generator().manual_seed(0)
p = [torch.randn(1031, generator=g), torch.randn(77, generator=g).bfloat16(), torch.randn(45, generator=g).half()]
zokern.perturb_(p, 5, 0.5, stream_ids=[1, 2, 3], backend="cpp")
zokern.fused_step_(p, 6, stream_ids=[1, 2, 3], restore=0.1, lr=0.2, grad=0.3, next_seed=7, next_scale=0.01,
                   backend="cpp")
masks = zokern.new_masks(p)
zokern.masked_perturb_(p, masks, zokern.magnitude_thresholds(p, 0.5), 8, 0.1, stream_ids=[1, 2, 3],
                       compute_mask=True, backend="cpp")
hessians = [torch.rand(q.shape, generator=g) + 0.5 for q in p]
zokern.hessian_step_(p, hessians, 9, stream_ids=[1, 2, 3], restore=0.1, lr=0.2, grad=0.3, hess_scale=2.0,
                     alpha=0.1, backend="cpp")
anchors = [(q.float() + 0.25).to(q.dtype) for q in p]
norms = zokern.distance_norms(p, anchors, backend="cpp")
zokern.anchored_rescale_(p, anchors, torch.tensor([0.9, 1.1, 0.7]), backend="cpp")
ws = [torch.randn(37, 300, generator=g).bfloat16(), torch.randn(20, 9, generator=g).half(), torch.randn(5, 7, generator=g)]
ranks = [5, 3, 2]
us = [torch.randn(w.shape[0], r, generator=g).to(w.dtype) for w, r in zip(ws, ranks)]
vs = [torch.randn(w.shape[1], r, generator=g).to(w.dtype) for w, r in zip(ws, ranks)]
zokern.lowrank_apply_(ws, us, vs, [torch.randn(r, r, generator=g) for r in ranks], backend="cpp")
torch.save(p + masks + hessians + [norms] + ws, sys.argv[1])
"""


@pytest.mark.parametrize("level", ["generic", "avx2"])
def test_narrower_simd_paths_give_the_same_bits(tmp_path, level):
    """The ISA chosen at run time (baseline, AVX2, AVX-512) changes speed, never results."""
    import os
    import subprocess
    import sys

    results = {}
    for name, cap in (("default", None), (level, level)):
        env = {k: v for k, v in os.environ.items() if k != "ZOKERN_CPU_SIMD"}
        if cap:
            env["ZOKERN_CPU_SIMD"] = cap
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _SIMD_PROBE, str(out)], env=env, check=True, timeout=300)
        results[name] = torch.load(out, weights_only=True)
    for a, b in zip(results["default"], results[level]):
        assert torch.equal(a, b)
