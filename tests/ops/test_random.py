"""The random stream (docs/RANDOM.md) and the ops that expose it, fill_random_ and philox_words_: golden vectors,
every backend against the reference (words bit for bit, Gaussian values within 4 float32 ulps, Rademacher values
bit for bit), windows of one stream, opcheck, invariances and distribution checks."""
import hashlib
import math
import re
import struct
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import zokern
from zokern import backends
from zokern.random import (DISTRIBUTION_SINCE, LOWRANK_BFLOAT16_SINCE, ROUNDING_SINCE, STREAM_VERSION, TWO_PI_2M24,
                           VALUES_SINCE, Distribution, Domain, check_stream_version, parse_distribution, philox4x32,
                           reference_draw, replay_changes)
from conftest import available_pairs, backend_kernels, philox_words, ulp_distance

# Random123's known-answer vectors for philox4x32-10: (counter, key) -> words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SEED = 0x123456789ABCDEF0
# zokern's own golden values (docs/RANDOM.md), seed SEED, stream 7.
GOLDEN_NORMAL = [0.23827049136161804, 0.43182945251464844, -0.43032172322273254, -0.9039639234542847,
                 0.6619070768356323, 1.931183099746704, -0.5776928067207336, -0.49186253547668457]
GOLDEN_NORMAL_AT_2_40_PLUS_2 = [-0.04962553456425667, 0.5200377106666565, -0.21427354216575623,
                                0.1439128965139389, -0.06266361474990845, 1.3621810674667358]
GOLDEN_RADEMACHER = [-1, 1, -1, -1, 1, 1, -1, -1]
# One bit per element: the low byte of call 0's w0 is 0xF7; offset 124 crosses from call 0 into call 1.
GOLDEN_RADEMACHER_BIT = [-1, -1, -1, 1, -1, -1, -1, -1]
GOLDEN_RADEMACHER_BIT_AT_124 = [1, -1, 1, -1, 1, -1, -1, 1]
GOLDEN_RADEMACHER_BIT_AT_2_40_PLUS_126 = [-1, 1, 1, 1, 1, -1]
GOLDEN_CORE_DOMAIN = [1.4513555765151978, -0.3173693120479584, 0.6547306776046753, -0.3648676872253418]

PAIRS = available_pairs()


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32(counter, key)) == expected


@pytest.mark.parametrize("backend,device", PAIRS)
def test_golden_vectors(backend, device):
    def draw(n, **kw):
        return zokern.draw(SEED, 7, n, device=device, backend=backend, **kw).cpu()

    assert ulp_distance(draw(8), torch.tensor(GOLDEN_NORMAL)).max() <= 4
    assert ulp_distance(draw(6, offset=(1 << 40) + 2), torch.tensor(GOLDEN_NORMAL_AT_2_40_PLUS_2)).max() <= 4
    assert draw(8, dist="rademacher").tolist() == GOLDEN_RADEMACHER
    assert draw(8, dist="rademacher_bit").tolist() == GOLDEN_RADEMACHER_BIT
    assert draw(8, offset=124, dist="rademacher_bit").tolist() == GOLDEN_RADEMACHER_BIT_AT_124
    assert draw(6, offset=(1 << 40) + 126, dist="rademacher_bit").tolist() == GOLDEN_RADEMACHER_BIT_AT_2_40_PLUS_126
    assert ulp_distance(draw(4, domain=Domain.CORE), torch.tensor(GOLDEN_CORE_DOMAIN)).max() <= 4


@pytest.mark.parametrize("backend,device", PAIRS)
def test_philox_known_answer_on_every_backend(backend, device):
    # Random123's philox4x32-10 vector for counter 0, key 0.
    assert philox_words(0, 0, 0, 0, 1, device, backend).tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]]


@pytest.mark.parametrize("backend,device", available_pairs(include_reference=False))
@pytest.mark.parametrize("first_call", [0, 12345, (1 << 32) - 3, (1 << 40) + 7, (1 << 60) - 1000])
def test_philox_words_identical_to_reference(backend, device, first_call):
    """Counters crossing into c1 = 1 and beyond, with keys that use both words, every stream and domain bit."""
    n = 1000
    for seed, stream, domain in [(SEED, 0xFFFFFFFF, Domain.SUBSPACE_V), (0, 0, 0), ((1 << 63) - 1, 7, 0xFFFFFFFF),
                                 (0xFFFFFFFF, 77, Domain.DIZO)]:
        got = philox_words(seed, stream, domain, first_call, n, device, backend).cpu()
        assert got.dtype == torch.int64 and got.shape == (n, 4)
        j = torch.arange(first_call, first_call + n, dtype=torch.int64)
        expected = torch.stack(philox4x32((j & 0xFFFFFFFF, j >> 32, stream, int(domain)),
                                          (seed & 0xFFFFFFFF, seed >> 32)), dim=-1)
        assert torch.equal(got, expected), (seed, stream, domain)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("offset", [0, 1, 3, (1 << 31) + 5, (1 << 50) + 2])
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_draw_matches_reference(backend, device, offset, numel):
    expected = reference_draw(SEED, 3, numel, offset)
    got = zokern.draw(SEED, 3, numel, offset=offset, device=device, backend=backend).cpu()
    assert ulp_distance(got, expected).max() <= 4
    for dist in ("rademacher", "rademacher_bit"):
        rad = zokern.draw(SEED, 3, numel, offset=offset, dist=dist, device=device, backend=backend).cpu()
        assert torch.equal(rad, reference_draw(SEED, 3, numel, offset, dist=dist)), dist


def float64_normals(seed: int, stream: int, numel: int, offset: int) -> torch.Tensor:
    """docs/RANDOM.md's Gaussian with u and t as defined, log, sqrt, cos and sin in float64, rounded once."""
    j = torch.arange(offset >> 2, (offset + numel + 3) >> 2, dtype=torch.int64)
    words = philox4x32((j & 0xFFFFFFFF, j >> 32, stream, int(Domain.PERTURBATION)), (seed & 0xFFFFFFFF, seed >> 32))
    pairs = []
    for a, b in ((words[0], words[1]), (words[2], words[3])):
        r = torch.sqrt(-2.0 * torch.log(((a >> 8) + 1).double() * 2.0**-24))
        t = ((b >> 8).float() * TWO_PI_2M24).double()
        pairs += [r * torch.cos(t), r * torch.sin(t)]
    values = torch.stack(pairs, dim=-1).reshape(-1).float()
    return values[offset & 3:(offset & 3) + numel]


CPU_PAIRS = [p for p in PAIRS if p.values[1] == "cpu" and p.values[0] in ("reference", "cpp")]


@pytest.mark.parametrize("backend,device", CPU_PAIRS)
@pytest.mark.parametrize("offset", [0, (1 << 40) + 1])
def test_normals_within_3_ulps_of_float64(backend, device, offset):
    """The CPU backends' normals against the float64 evaluation rounded once: the C++ kernels' float32
    polynomials and the reference's torch float32 functions are each within 3 ulps of it (docs/RANDOM.md)."""
    got = zokern.draw(SEED, 5, 1 << 20, offset=offset, device=device, backend=backend)
    assert ulp_distance(got, float64_normals(SEED, 5, 1 << 20, offset)).max() <= 3


# sha256 of the C++ CPU kernels' normals 3 … 3 + 2^20 − 1 of (SEED, stream 5), float32 bytes, by stream version.
# Their values are the same at every ISA level (test_prebuilt_library.py) and on every machine, so a change to them
# without a new stream version (and VALUES_SINCE) fails here: logs of the version would not replay bitwise.
CPP_NORMALS_SHA256 = {**{version: "373f376829f3d19a67eae1e9106abeee78250712870f7881e527e798e6356408"
                         for version in (4, 5, 6)},
                      7: "59619e92b36e1b246f0c24b920f83b03964b87d4199a145c343a7cd3c8a867b5"}


def test_cpp_normals_are_those_of_the_stream_version():
    if not backends.availability("cpp", "cpu")[0]:
        pytest.skip("cpp backend unavailable")
    got = zokern.draw(SEED, 5, 1 << 20, offset=3, backend="cpp")
    assert hashlib.sha256(got.numpy().tobytes()).hexdigest() == CPP_NORMALS_SHA256[STREAM_VERSION]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dist", ["normal", "rademacher_bit"])
def test_draw_is_what_perturb_applies(backend, device, dist):
    """The public draw returns exactly the z a backend's perturbation kernel adds."""
    p = torch.zeros(1031, device=device)
    zokern.perturb_([p], SEED, 1.0, stream_ids=[11], dist=dist, backend=backend)
    assert torch.equal(p, zokern.draw(SEED, 11, 1031, dist=dist, device=device, backend=backend))


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("domain", [Domain.PERTURBATION, Domain.CORE])
def test_windows_are_one_stream_on_every_backend(backend, device, domain):
    """A draw over several of the C++ kernels' 65536-element chunks and the Triton blocks is the reference stream,
    and windows at offsets inside a Philox call and across those boundaries are bit for bit its slices."""
    whole = zokern.draw(SEED, 9, 70001, domain=domain, device=device, backend=backend)
    assert ulp_distance(whole.cpu(), reference_draw(SEED, 9, 70001, domain=domain)).max() <= 4
    for offset in (1, 3, 6, 65535):
        part = zokern.draw(SEED, 9, 4099, offset=offset, domain=domain, device=device, backend=backend)
        assert torch.equal(part, whole[offset:offset + 4099]), offset


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("op", ["fill_random_", "philox_words_"])
def test_opcheck(backend, device, op):
    out = torch.empty((37,) if op == "fill_random_" else (9, 4), dtype=torch.float32 if op == "fill_random_"
                      else torch.int64, device=device)
    args = (out, SEED, 4, 5, 0, 0, backend) if op == "fill_random_" else (out, SEED, 4, 3, (1 << 32) - 2, backend)
    torch.library.opcheck(getattr(torch.ops.zokern, op), args)


@pytest.mark.parametrize("dist", list(Distribution))
def test_offsets_are_windows_of_one_stream(dist):
    whole = reference_draw(5, 9, 400, dist=dist)
    for offset in (0, 1, 2, 3, 5, 17, 127, 128, 250):
        assert torch.equal(reference_draw(5, 9, 130, offset, dist=dist), whole[offset:offset + 130])


def test_rademacher_bit_layout():
    """Element i is bit i mod 32 (least significant first) of word (i >> 5) mod 4 of Philox call i >> 7:
    written out here on the raw words, independently of the reference's vectorised form."""
    seed, stream, domain, first_call, calls = SEED, 5, int(Domain.CORE), (1 << 33) - 1, 3
    j = torch.arange(first_call, first_call + calls, dtype=torch.int64)
    words = torch.stack(philox4x32((j & 0xFFFFFFFF, j >> 32, stream, domain), (seed & 0xFFFFFFFF, seed >> 32)), 1)
    expected = [-1.0 if (int(words[c, q]) >> b) & 1 else 1.0 for c in range(calls) for q in range(4) for b in range(32)]
    got = reference_draw(seed, stream, 128 * calls, 128 * first_call, domain, dist=Distribution.RADEMACHER_BIT)
    assert got.tolist() == expected


@pytest.mark.parametrize("backend,device", available_pairs(include_reference=False))
def test_rademacher_bit_depends_on_the_element_alone(backend, device):
    """Chunk and block edges anywhere (not on the 128-element calls), tensors of awkward sizes and in any
    grouping: element i of tensor t is always element i of stream t, as the fused ops and fill apply it."""
    kernels = backend_kernels(backend, device)
    sizes = [1, 5, 127, 128, 129, 1000, 4099]
    streams = [40 + k for k in range(len(sizes))]
    want = [reference_draw(SEED, s, n, dist=Distribution.RADEMACHER_BIT).to(device) for s, n in zip(streams, sizes)]
    # Triton: small blocks too, so that blocks and not only chunks end inside a call's 128 elements (and no
    # chunk of 4, thousands of programs for the interpreter).
    triton = backend == "triton"
    for chunk in (None, 36, 100) if triton else (None, 4, 36, 100, 1 << 20):
        kw = {} if chunk is None else {"chunk": chunk, **({"block": 32} if triton else {})}
        params = [torch.zeros(n, device=device) for n in sizes]
        kernels.perturb(params, streams, SEED, 1.0, int(Distribution.RADEMACHER_BIT), **kw)
        assert all(torch.equal(p, z) for p, z in zip(params, want)), f"chunk={chunk}"
        # restore (−z), update 0, next perturbation with the same seed: z again, bit for bit.
        kernels.fused_step(params, streams, SEED, -1.0, 0.0, 0.0, [0.0] * len(sizes), SEED, 1.0,
                           int(Distribution.RADEMACHER_BIT), **kw)
        assert all(torch.equal(p, z) for p, z in zip(params, want)), f"chunk={chunk}, fused step"
    for offset in (3, 100, 129):
        out = torch.empty(500, device=device)
        kernels.fill_random(out, SEED, 40, offset, 0, int(Distribution.RADEMACHER_BIT))
        assert torch.equal(out.cpu(), reference_draw(SEED, 40, 500, offset, dist=Distribution.RADEMACHER_BIT))


def test_deterministic_and_keyed_by_all_inputs():
    base = reference_draw(5, 9, 4096)
    assert torch.equal(base, reference_draw(5, 9, 4096))
    for other in (reference_draw(6, 9, 4096), reference_draw(5, 10, 4096),
                  reference_draw(5, 9, 4096, domain=Domain.SUBSPACE_U)):
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1]) < 0.05


@pytest.mark.parametrize("domain", list(Domain))
def test_normal_distribution(domain):
    z = reference_draw(2024, 1, 1 << 20, domain=domain).double()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z.numpy())) < 0.02
    assert abs(stats.kurtosis(z.numpy()) - 0) < 0.03  # excess kurtosis of a Gaussian
    assert stats.kstest(z[: 1 << 16].numpy(), "norm").pvalue > 1e-3
    assert z.abs().max() <= math.sqrt(48 * math.log(2)) + 1e-6
    # neighbours are independent: both members of a Box–Muller pair and adjacent Philox calls
    assert abs(torch.corrcoef(torch.stack([z[0::2], z[1::2]]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[0:-4], z[4:]]))[0, 1]) < 0.01


@pytest.mark.parametrize("dist", [Distribution.RADEMACHER, Distribution.RADEMACHER_BIT])
def test_rademacher_distribution(dist):
    z = reference_draw(2024, 1, 1 << 20, dist=dist)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    plus = int((z > 0).sum())
    assert stats.binomtest(plus, z.numel()).pvalue > 1e-3
    assert abs(torch.corrcoef(torch.stack([z[0:-1], z[1:]]))[0, 1]) < 0.01


def test_rademacher_bit_balance_and_independence():
    """Each of the 128 bit positions of a call is a fair sign (chi-square over positions), and neighbours are
    independent (chi-square of the 2×2 table of pairs: within a word, across words, across calls)."""
    minus = (reference_draw(77, 3, 1 << 21, dist=Distribution.RADEMACHER_BIT) < 0).long()
    calls = minus.view(-1, 128)
    per_position = calls.sum(0).double()
    n = calls.shape[0]
    chi2 = float((((per_position - n / 2) ** 2) / (n / 2) + ((n - per_position - n / 2) ** 2) / (n / 2)).sum())
    assert stats.chi2.sf(chi2, df=128) > 1e-3, f"bit positions: chi2 {chi2}"
    for name, left, right in [("neighbours", minus[:-1], minus[1:]),
                              ("across words", calls[:, 31:127:32].reshape(-1), calls[:, 32::32].reshape(-1)),
                              ("across calls", calls[:-1, 127], calls[1:, 0]),
                              ("word lag", minus[:-32], minus[32:])]:
        table = torch.bincount(2 * left + right, minlength=4).view(2, 2).numpy()
        assert stats.chi2_contingency(table).pvalue > 1e-3, f"{name}: {table.tolist()}"
        assert stats.binomtest(int(left.sum()), left.numel()).pvalue > 1e-3, name


def test_stream_versions():
    assert STREAM_VERSION == max(*DISTRIBUTION_SINCE.values(), *VALUES_SINCE.values(), ROUNDING_SINCE,
                                 LOWRANK_BFLOAT16_SINCE) == 7
    # Version 3 changed the C++ kernels alone (their low-rank sums, CPU and CUDA), versions 4 and 7 the C++ CPU
    # kernels' normals, version 5 the rounding words of every backend, met only by a run rounding 16-bit tensors
    # stochastically, version 6 a bfloat16 matrix's low-rank sums on every backend, met only by a run that updates
    # bfloat16 tensors by low rank.
    assert replay_changes(3, ["cpp"], False) == ["backend 'cpp' computes differently since version 7"]
    assert replay_changes(6, ["cpp"], False) == ["backend 'cpp' computes differently since version 7"]
    assert replay_changes(7, ["cpp"], False) == []
    assert replay_changes(2, ["cuda", "cpp"], False) == ["backend 'cpp' computes differently since version 7",
                                                         "backend 'cuda' computes differently since version 3"]
    assert replay_changes(3, ["cuda"], False) == []
    assert replay_changes(1, ["reference", "triton"], False) == []
    assert replay_changes(4, ["reference"], True) == [
        "stochastic rounding to 16 bits takes other rounding words since version 5"]
    assert replay_changes(5, ["reference", "triton", "cuda"], True) == []
    assert replay_changes(5, ["reference"], False, True) == [
        "the low-rank update of a bfloat16 matrix sums bfloat16 operands since version 6"]
    assert replay_changes(7, ["reference", "triton", "cpp", "cuda"], True, True) == []
    assert set(DISTRIBUTION_SINCE) == set(Distribution)
    assert check_stream_version(1, "rademacher") == 1
    with pytest.raises(ValueError, match="'rademacher_bit' does not exist in random stream version 1"):
        check_stream_version(1, "rademacher_bit")
    for bad in (0, STREAM_VERSION + 1, "2", True):
        with pytest.raises(ValueError, match="is not one this zokern draws"):
            check_stream_version(bad)
    assert parse_distribution("rademacher-bit") is parse_distribution(2) is Distribution.RADEMACHER_BIT
    with pytest.raises(ValueError, match="expected one of 'normal', 'rademacher', 'rademacher_bit'"):
        parse_distribution("uniform")
    with pytest.raises(ValueError, match="unknown distribution 3"):
        parse_distribution(3)


def test_the_stream_module_imports_nothing_of_zokern():
    """zokern.random is what the ops build on: an import of zokern from it (even inside a function) would
    make a cycle."""
    import ast
    import inspect

    import zokern.random

    tree = ast.parse(inspect.getsource(zokern.random))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
        [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [name for name in imported if name.split(".")[0] == "zokern"]
    assert zokern.draw is zokern.ops.draw


@pytest.mark.parametrize("method", ["MeZO", "HiZOO", "SparseMeZO"])
def test_optimizers_draw_the_one_bit_stream(method):
    """`dist="rademacher_bit"` reaches the kernels: the first perturbed forward sees θ + ε·z with z the one-bit
    stream of the step's seed (HiZOO, after its forward at θ: z/√D with D = 1; Sparse MeZO: masked, every
    element in with sparsity 0)."""
    from zokern.random import step_seed

    p = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(3)))
    start = p.detach().clone()
    options = {"sparsity": 0.0} if method == "SparseMeZO" else {}
    opt = getattr(zokern.optim, method)([p], lr=1e-3, eps=0.25, seed=11, dist="rademacher_bit", **options)
    seen = []
    opt.step(lambda: seen.append(p.detach().clone()) or p.sum())
    z = reference_draw(step_seed(11, 0), opt.buckets[0].stream_ids[0], 300, dist=Distribution.RADEMACHER_BIT)
    assert torch.equal(seen[1 if method == "HiZOO" else 0], start + 0.25 * z)


# The C++ CPU kernels' Box–Muller constants (zo_cpu_kernels.inc, stream version 7) are derived data written out as
# literals: here they are derived again as that file's comments define them, in 60-digit decimal arithmetic.
KERNELS = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "zo_cpu_kernels.inc"
PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")


def _float32(x):
    """The float32 nearest the decimal x, as a float (rounded once: the nearest of a guess and its neighbours)."""
    guess = np.float32(float(x))
    candidates = [guess, np.nextafter(guess, np.float32(-np.inf)), np.nextafter(guess, np.float32(np.inf))]
    distances = sorted((abs(Decimal(float(c)) - x), float(c)) for c in candidates)
    assert distances[0][0] < distances[1][0], f"{x} is a float32 tie"
    return distances[0][1]


def _kernel_literals(pattern):
    """The hexadecimal float literals that the groups of pattern match in zo_cpu_kernels.inc, comma lists split."""
    found = re.search(pattern, KERNELS.read_text(), re.S)
    assert found, f"{pattern!r} is not in {KERNELS}"
    return [float.fromhex(t.strip().removesuffix("f")) for group in found.groups() for t in group.split(",")]


def test_box_muller_constants_are_derived_as_documented():
    with localcontext(prec=60):
        units = Decimal(2) ** 16
        inv_m2, log_hi, log_lo = [], [], []
        for i in range(16):
            # Interval i: 2^19 float patterns from 0x3F3C0000 (0x1.78p-1); the float32 reciprocal of its center.
            center = struct.unpack("<f", struct.pack("<I", 0x3F3C0000 + (i << 19) + (1 << 18)))[0]
            inv = _float32(1 / Decimal(center))
            twice_log = 2 * Decimal(inv).ln()
            high = (twice_log * units).to_integral_value() / units  # the nearest multiple of 2^-16
            inv_m2.append(-2 * inv)
            log_hi.append(float(high))
            log_lo.append(_float32(twice_log - high))
        assert _kernel_literals(r"kLogInvM2\[16\] = \{(.*?)\};") == inv_m2
        assert _kernel_literals(r"kLogHi\[16\] = \{(.*?)\};") == log_hi
        assert _kernel_literals(r"kLogLo\[16\] = \{(.*?)\};") == log_lo
        # −2·ln 2 as a 17-bit multiple of 2^-16 (k times it is exact in float32 for |k| <= 25), and the rest.
        ln2_high, ln2_low = _kernel_literals(r"high = fma_each\(dk, F\{\} - (\S+?)f,.*?"
                                             r"low = fma_each\(dk, F\{\} - (\S+?)f,")
        assert Decimal(ln2_high) * units % 1 == 0 and 2 ** 16 <= Decimal(ln2_high) * units < 2 ** 17
        assert ln2_low == _float32(2 * Decimal(2).ln() - Decimal(ln2_high))
        # 2/π; π/2 in three parts, float32(π/2) and each next the float32 of what the parts before it leave.
        two_over_pi, part3, part2, part1 = _kernel_literals(
            r"q_shifted = fma_each\(t, F\{\} \+ (\S+?)f,.*?r = fma_each\(n, F\{\} \+ (\S+?)f,\s*"
            r"fma_each\(n, F\{\} \+ (\S+?)f, fma_each\(n, F\{\} - (\S+?)f, t\)\)\)")
        assert two_over_pi == _float32(2 / PI)
        assert part1 == _float32(PI / 2)
        assert part2 == _float32(Decimal(part1) - PI / 2)
        assert part3 == _float32(Decimal(part1) - PI / 2 - Decimal(part2))
