"""The random stream (docs/RANDOM.md) and the ops that expose it, fill_random_ and philox_words_: golden vectors,
every backend against the reference (words bit for bit, Gaussian values within 4 float32 ulps, Rademacher values
bit for bit), windows of one stream, opcheck, invariances and distribution checks."""
import math

import pytest
import torch
from scipy import stats

import zokern
from zokern.random import Distribution, Domain, philox4x32, reference_draw
from conftest import available_pairs, philox_words, ulp_distance

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
    rad = zokern.draw(SEED, 3, numel, offset=offset, dist="rademacher", device=device, backend=backend).cpu()
    assert torch.equal(rad, reference_draw(SEED, 3, numel, offset, dist="rademacher"))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_draw_is_what_perturb_applies(backend, device):
    """The public draw returns exactly the z a backend's perturbation kernel adds."""
    p = torch.zeros(1031, device=device)
    zokern.perturb_([p], SEED, 1.0, stream_ids=[11], backend=backend)
    assert torch.equal(p, zokern.draw(SEED, 11, 1031, device=device, backend=backend))


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


def test_offsets_are_windows_of_one_stream():
    whole = reference_draw(5, 9, 64)
    for offset in (0, 1, 2, 3, 5, 17):
        assert torch.equal(reference_draw(5, 9, 10, offset), whole[offset:offset + 10])


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


def test_rademacher_distribution():
    z = reference_draw(2024, 1, 1 << 20, dist=Distribution.RADEMACHER)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    plus = int((z > 0).sum())
    assert stats.binomtest(plus, z.numel()).pvalue > 1e-3
    assert abs(torch.corrcoef(torch.stack([z[0:-1], z[1:]]))[0, 1]) < 0.01


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
