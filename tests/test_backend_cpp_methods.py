"""The C++ method ops (low-rank, magnitude mask, diagonal Hessian, anchored rescale): the CPU extension against
the reference backend over every dtype and awkward sizes, bitwise masks, chunk invariance, the adversarial
threshold round trip, and the CUDA extension against the CPU one."""
import pytest
import torch
from conftest import assert_lowrank_rounded_from_float32, backend_kernels

from zokern import backends
from zokern.backends import reference as ref
from zokern.ops import magnitude_thresholds, new_masks
from zokern.random import Domain

CPU_OK, CPU_WHY = backends.availability("cpp", "cpu")
cpp_cpu = backend_kernels("cpp", "cpu")
pytestmark = pytest.mark.skipif(not CPU_OK, reason=f"cpp backend unavailable: {CPU_WHY}")

SEED, NEXT = 0x5EED_0123_4567_89AB, 424242
NORMAL, RADEMACHER = 0, 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUMELS = [1, 31, 33, 1000, 4099]  # around mask words (32), Philox calls (4) and CUDA steps (8)
CHUNKS = [1, 7, 32, 33, 1000]     # the masked ops round chunks up to whole mask words
MATRICES = [(1, 1), (17, 5), (64, 48), (100, 3), (70, 130)]  # 70×130: ragged 64×64 tiles
RANKS = [1, 3, 8, 17, 64]


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def storage_ulps(got, want):
    """max |got − want| in units of the spacing of want's dtype at |want|."""
    a = want.abs()
    spacing = torch.nextafter(a, torch.tensor(float("inf"), dtype=a.dtype)).double() - a.double()
    return ((got.double() - want.double()).abs() / spacing).max().item()


def assert_same(got, want, what=""):
    """Bitwise: the reference composes the same separately rounded float32 operations on the same z."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(bits(g.cpu()), bits(w.cpu())), \
            f"{what} {w.dtype} {tuple(w.shape)}: {storage_ulps(g.cpu(), w.cpu())} ulps"


@pytest.fixture
def same_z(monkeypatch):
    """The reference drawing the backend's own z (fill_random), so the ops' arithmetic alone is compared:
    the Box–Muller transcendentals of the two differ by a few float32 ulps (docs/RANDOM.md)."""
    def z(seed, stream, p, dist, offset):
        out = torch.empty(p.numel())
        cpp_cpu.fill_random(out, seed, stream, offset, Domain.PERTURBATION, dist)
        return out.to(p.device).view(p.shape)

    monkeypatch.setattr(ref, "_z", z)


def make_params(seed=0, device="cpu", numels=NUMELS, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dt).to(device) for dt in DTYPES for n in numels]


def clone(ts):
    return [t.clone() for t in ts]


# --- low-rank ---------------------------------------------------------------------------------------

def make_lowrank(dtype, factor_dtypes=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ws, us, vs, cs = [], [], [], []
    for m, n in MATRICES:
        for r in RANKS:
            fu, fv = factor_dtypes or (dtype, dtype)
            ws.append(torch.randn(m, n, generator=g).to(dtype).to(device))
            us.append(torch.randn(m, r, generator=g).to(fu).to(device))
            vs.append(torch.randn(n, r, generator=g).to(fv).to(device))
            cs.append((torch.randn(r, r, generator=g) / r).to(device))
    return ws, us, vs, cs


def lowrank_in_documented_order(w, u, v, c):
    """element.h's order with torch's separately rounded float32 ops: U·C over b, then the sum over a."""
    uc = torch.zeros(u.shape[0], c.shape[1])
    for b in range(c.shape[0]):
        uc = uc + u[:, b:b + 1].float() * c[b]
    delta = torch.zeros(w.shape)
    for a in range(c.shape[1]):
        delta = delta + uc[:, a:a + 1] * v[:, a].float()
    return (w.float() + delta).to(w.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_matches_float64(dtype):
    ws, us, vs, cs = make_lowrank(dtype)
    originals = clone(ws)
    cpp_cpu.lowrank_apply(ws, us, vs, cs)  # every matrix and rank in one call
    for got, w, u, v, c in zip(ws, originals, us, vs, cs):
        assert_lowrank_rounded_from_float32(got, w, u, v, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_sums_in_the_documented_order(dtype):
    """Bit for bit the order element.h fixes (the one the CUDA tiles use too)."""
    ws, us, vs, cs = make_lowrank(dtype, seed=1)
    want = [lowrank_in_documented_order(w, u, v, c) for w, u, v, c in zip(ws, us, vs, cs)]
    cpp_cpu.lowrank_apply(ws, us, vs, cs)
    assert_same(ws, want)


def test_lowrank_mixed_factor_dtypes():
    ws, us, vs, cs = make_lowrank(torch.bfloat16, factor_dtypes=(torch.float32, torch.float16), seed=2)
    want = [lowrank_in_documented_order(w, u, v, c) for w, u, v, c in zip(ws, us, vs, cs)]
    cpp_cpu.lowrank_apply(ws, us, vs, cs)
    assert_same(ws, want)


# --- magnitude mask ---------------------------------------------------------------------------------

def masked_sequence(backend, params, masks, thresholds, streams, dist, **kw):
    """A Sparse MeZO step: +ε with a new mask, −2ε, the fused restore + update + next mask, and the
    fused step without a next perturbation."""
    wds = [0.1 * (k % 3) for k in streams]
    backend.masked_perturb(params, masks, thresholds, streams, SEED, 0.37, True, dist, **kw)
    yield "perturb (new mask)"
    backend.masked_perturb(params, masks, thresholds, streams, SEED, -0.74, False, dist, **kw)
    yield "perturb (stored mask)"
    backend.masked_fused_step(params, masks, thresholds, streams, SEED, 0.37, 1e-2, -3.5, wds, NEXT, 0.37, dist, **kw)
    yield "fused step"
    backend.masked_fused_step(params, masks, thresholds, streams, NEXT, 0.37, 0.25, 2.0, wds, -1, 0.0, dist, **kw)
    yield "fused step, no next"


def masked_setup(seed=0, device="cpu", numels=NUMELS):
    params = make_params(seed, device, numels)
    thresholds = magnitude_thresholds(params, 0.5)
    return params, new_masks(params), thresholds, [100 + k for k in range(len(params))]


@pytest.mark.parametrize("dist", [NORMAL, RADEMACHER])
def test_masked_matches_reference(same_z, dist):
    params, masks, thresholds, streams = masked_setup()
    want, want_masks = clone(params), clone(masks)
    for what, _ in zip(masked_sequence(cpp_cpu, params, masks, thresholds, streams, dist),
                       masked_sequence(ref, want, want_masks, thresholds, streams, dist)):
        assert all(torch.equal(a, b) for a, b in zip(masks, want_masks)), what
        assert_same(params, want, what)


def test_masked_chunk_invariance():
    base, base_masks, thresholds, streams = masked_setup(1)
    for _ in masked_sequence(cpp_cpu, base, base_masks, thresholds, streams, NORMAL):
        pass
    for chunk in CHUNKS:
        params, masks, _, _ = masked_setup(1)
        for _ in masked_sequence(cpp_cpu, params, masks, thresholds, streams, NORMAL, chunk=chunk):
            pass
        assert all(torch.equal(a, b) for a, b in zip(masks, base_masks)), chunk
        assert_same(params, base, f"chunk={chunk}")


def test_mask_words_past_the_end_are_zero():
    p = torch.zeros(33)  # every element is in the mask (|0| <= 0)
    mask = torch.full((2,), -1, dtype=torch.int32)
    cpp_cpu.masked_perturb([p], [mask], torch.zeros(1), [0], SEED, 0.0, True, NORMAL)
    assert mask.tolist() == [-1, 1]


def threshold_neighbours(dtype):
    """Weights exactly at h = 0.75, one ulp either side, and their negatives, among random ones."""
    h = torch.tensor([0.75], dtype=dtype)
    edge = torch.cat([torch.nextafter(h, torch.tensor([2.0], dtype=dtype)), h,
                      torch.nextafter(h, torch.tensor([0.0], dtype=dtype))])
    g = torch.Generator().manual_seed(3)
    x = torch.cat([edge, -edge, (torch.rand(58, generator=g) * 1.5).to(dtype)])
    return x, h.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_round_trip_at_the_threshold(dtype):
    """+ε (new mask), −2ε (stored mask), restore (lr = 0): every weight returns to within rounding of its
    start; none is left displaced by ε·z, which a mask re-taken from perturbed weights would do."""
    x, h = threshold_neighbours(dtype)
    eps = 8 * torch.finfo(dtype).eps  # ±1 draws move a masked weight by 8 ulps at least (|x| < 2)
    top = (x.abs().float() + eps).to(dtype)  # the largest magnitude a weight passes through
    ulp = (torch.nextafter(top, torch.tensor(4.0, dtype=dtype)) - top).double()
    p, mask = x.clone(), new_masks([x])[0]
    cpp_cpu.masked_perturb([p], [mask], h, [7], SEED, eps, True, RADEMACHER)
    want_mask = ref._unpack_mask(mask, x.numel())
    assert torch.equal(want_mask, x.float().abs() <= h), "the mask of the unperturbed weights"
    assert want_mask[:6].tolist() == [False, True, True, False, True, True]
    assert (p != x)[want_mask].all() and (p == x)[~want_mask].all()
    cpp_cpu.masked_perturb([p], [mask], h, [7], SEED, -2 * eps, False, RADEMACHER)
    cpp_cpu.masked_fused_step([p], [mask], h, [7], SEED, eps, 0.0, 0.0, [0.0], -1, 0.0, RADEMACHER)
    assert ((p.double() - x.double()).abs() <= 2 * ulp).all()  # three roundings; displaced: eps ≥ 4 such ulps
    assert torch.equal(ref._unpack_mask(mask, x.numel()), want_mask)


# --- diagonal Hessian -------------------------------------------------------------------------------

def hessian_setup(d_dtype, seed=0, device="cpu", numels=NUMELS):
    params = make_params(seed, device, numels)
    g = torch.Generator().manual_seed(seed + 1)
    hessians = [(0.25 + torch.rand(p.numel(), generator=g)).to(p.dtype if d_dtype == "param" else torch.float32)
                .to(device) for p in params]
    return params, hessians, [200 + k for k in range(len(params))]


def hessian_sequence(backend, params, hessians, streams, dist, **kw):
    wds = [0.1 * (k % 3) for k in streams]
    backend.hessian_perturb(params, hessians, streams, SEED, 1e-2, dist, **kw)
    yield "perturb"
    backend.hessian_step(params, hessians, streams, SEED, 1e-2, 1e-2, -3.5, 40.0, 0.3, wds, NEXT, 1e-2, dist, **kw)
    yield "step"
    backend.hessian_step(params, hessians, streams, NEXT, 1e-2, 0.5, 2.0, 0.7, 1e-3, wds, -1, 0.0, dist, **kw)
    yield "step, no next"


@pytest.fixture
def exact_sqrt(monkeypatch):
    """torch's vectorised CPU sqrt is within an ulp, not correctly rounded (about 1 in 5 float32 results
    differ); the kernels' is IEEE. In double and rounded once it is exact, so the comparison stays bitwise."""
    sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: sqrt(x.double()).to(x.dtype))


@pytest.mark.parametrize("d_dtype", ["float32", "param"])
@pytest.mark.parametrize("dist", [NORMAL, RADEMACHER])
def test_hessian_matches_reference(same_z, exact_sqrt, d_dtype, dist):
    params, hessians, streams = hessian_setup(d_dtype)
    want, want_d = clone(params), clone(hessians)
    for what, _ in zip(hessian_sequence(cpp_cpu, params, hessians, streams, dist),
                       hessian_sequence(ref, want, want_d, streams, dist)):
        assert_same(params, want, what)
        assert_same(hessians, want_d, what)


def test_hessian_mixed_dtypes_and_chunk_invariance():
    params, hessians, streams = hessian_setup("float32", seed=4)
    for k in range(0, len(params), 2):  # D in the param dtype for every other tensor
        hessians[k] = hessians[k].to(params[k].dtype)
    base, base_d = clone(params), clone(hessians)
    for _ in hessian_sequence(cpp_cpu, base, base_d, streams, NORMAL):
        pass
    for chunk in CHUNKS:
        p, d = clone(params), clone(hessians)
        for _ in hessian_sequence(cpp_cpu, p, d, streams, NORMAL, chunk=chunk):
            pass
        assert_same(p, base, f"chunk={chunk}")
        assert_same(d, base_d, f"chunk={chunk}")


# --- anchored rescale -------------------------------------------------------------------------------

def test_distance_norms_match_reference():
    params = make_params(5, numels=NUMELS + [0, 70001])
    anchors = make_params(6, numels=NUMELS + [0, 70001])
    want = ref.distance_norms(params, anchors)
    for chunk in (0, 1, 1000):  # 0: the default size
        got = cpp_cpu.distance_norms(params, anchors, chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == (len(params),)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert torch.equal(cpp_cpu.distance_norms(params, anchors), cpp_cpu.distance_norms(params, anchors))


@pytest.mark.parametrize("with_sources", [False, True])
def test_anchored_rescale_matches_reference(with_sources):
    params, anchors, sources = make_params(7), make_params(8), make_params(9)
    factors = torch.linspace(-1.5, 2.0, len(params))
    want = clone(params)
    ref.anchored_rescale(want, anchors, sources if with_sources else None, factors)
    for chunk in (0, 3):
        got = clone(params)
        cpp_cpu.anchored_rescale(got, anchors, sources if with_sources else None, factors, chunk=chunk)
        assert_same(got, want)


# --- CUDA against CPU -------------------------------------------------------------------------------

def cuda_test(f):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(f))


@pytest.fixture
def gpu():
    ok, why = backends.availability("cuda", "cuda")
    assert ok, why  # on a CUDA machine the extension must build
    return backend_kernels("cuda", "cuda")


def to_cuda(ts):
    return [t.cuda() for t in ts]


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_lowrank_matches_cpu(gpu, dtype):
    """Both sum in element.h's order: bit for bit, over ragged tiles, rank slices and mixed factor dtypes."""
    for factors in (None, (torch.float32, torch.float16)):
        ws, us, vs, cs = make_lowrank(dtype, factors, seed=10)
        cuda = [to_cuda(x) for x in (ws, us, vs, cs)]
        cpp_cpu.lowrank_apply(ws, us, vs, cs)
        gpu.lowrank_apply(*cuda)
        assert_same(cuda[0], ws)
    # A misaligned W view (vector access off) gives what an aligned copy does.
    storage = torch.randn(3 + 64 * 48, device="cuda").to(dtype)
    view, u, v, c = storage[3:].view(64, 48), torch.randn(64, 8, device="cuda"), torch.randn(48, 8, device="cuda"), \
        torch.randn(8, 8, device="cuda")
    aligned = view.clone()
    gpu.lowrank_apply([view], [u], [v], [c])
    gpu.lowrank_apply([aligned], [u], [v], [c])
    assert torch.equal(view, aligned)


@cuda_test
@pytest.mark.parametrize("dist", [NORMAL, RADEMACHER])
def test_cuda_masked_matches_cpu(gpu, dist):
    params, masks, thresholds, streams = masked_setup(11, numels=NUMELS + [70001])
    gpu_args = to_cuda(params), to_cuda(masks), thresholds.cuda()
    for what, _ in zip(masked_sequence(cpp_cpu, params, masks, thresholds, streams, dist),
                       masked_sequence(gpu, *gpu_args, streams, dist)):
        assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu_args[1], masks)), what
        if dist == RADEMACHER:  # the same float32 composition: bit for bit
            assert_same(gpu_args[0], params, what)
        else:  # z differs by a few ulps, so a weight may round the other way
            for a, b in zip(gpu_args[0], params):
                if b.dtype == torch.float32:
                    torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
                else:
                    assert storage_ulps(a.cpu(), b) <= 1, what
            if what == "perturb (stored mask)":
                break  # a next mask from updated weights could then differ at the threshold


@cuda_test
def test_cuda_masked_chunk_invariance(gpu):
    runs = []
    for chunk in (0, 32, 1000):
        p, m, thresholds, streams = masked_setup(11, "cuda", numels=NUMELS + [70001])
        for _ in masked_sequence(gpu, p, m, thresholds, streams, NORMAL, chunk=chunk):
            pass
        runs.append((p, m))
    for p, m in runs[1:]:
        assert_same(p, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(m, runs[0][1]))


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_cuda_masked_misaligned_view(gpu, dtype):
    storage = torch.randn(5003, device="cuda").to(dtype)
    view, aligned = storage[3:], storage[3:].clone()
    h = magnitude_thresholds([aligned], 0.5)
    results = []
    for p in (view, aligned):
        m = new_masks([p])
        for _ in masked_sequence(gpu, [p], m, h, [5], NORMAL):
            pass
        results.append(m[0])
    assert torch.equal(view, aligned) and torch.equal(*results)


@cuda_test
@pytest.mark.parametrize("d_dtype", ["float32", "param"])
def test_cuda_hessian_matches_cpu(gpu, d_dtype):
    params, hessians, streams = hessian_setup(d_dtype, seed=12, numels=NUMELS + [70001])
    gp, gd = to_cuda(params), to_cuda(hessians)
    for what, _ in zip(hessian_sequence(cpp_cpu, params, hessians, streams, RADEMACHER),
                       hessian_sequence(gpu, gp, gd, streams, RADEMACHER)):
        assert_same(gp, params, what)  # ±1 draws and IEEE sqrt/div on both: bit for bit
        assert_same(gd, hessians, what)
    base_p, base_d = clone(gp), clone(gd)
    for chunk in (1, 1000):
        p, d, _ = hessian_setup(d_dtype, seed=12, device="cuda", numels=NUMELS + [70001])
        for _ in hessian_sequence(gpu, p, d, streams, RADEMACHER, chunk=chunk):
            pass
        assert_same(p, base_p, f"chunk={chunk}")
        assert_same(d, base_d, f"chunk={chunk}")


@cuda_test
def test_cuda_distance_norms_and_rescale_match_cpu(gpu):
    numels = NUMELS + [0, 70001]
    params, anchors, sources = make_params(13, numels=numels), make_params(14, numels=numels), \
        make_params(15, numels=numels)
    want = cpp_cpu.distance_norms(params, anchors)
    got = gpu.distance_norms(to_cuda(params), to_cuda(anchors))
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=0)
    assert torch.equal(got, gpu.distance_norms(to_cuda(params), to_cuda(anchors)))  # deterministic
    factors = torch.linspace(-1.5, 2.0, len(params))
    for srcs in (None, sources):
        cpu = clone(params)
        cpp_cpu.anchored_rescale(cpu, anchors, srcs, factors)
        cuda = to_cuda(params)
        gpu.anchored_rescale(cuda, to_cuda(anchors), None if srcs is None else to_cuda(srcs), factors.cuda())
        assert_same(cuda, cpu)
