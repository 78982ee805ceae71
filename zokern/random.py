"""The zokern random stream, defined once (see docs/RANDOM.md).

This module is the reference implementation: plain PyTorch integer arithmetic on int64 tensors,
readable rather than fast. Every backend reproduces it; `zokern.draw` returns what a backend's kernels use.
It imports nothing of zokern: the ops build on it, not the other way round.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
# float32(2π) · 2^-24: turns the top 24 bits of a word into an angle in [0, 2π) with one rounding.
TWO_PI_2M24 = float(torch.tensor(2 * math.pi, dtype=torch.float32).item()) * 2.0**-24
SEED_LIMIT = 1 << 63
STREAM_LIMIT = 1 << 32


class Domain(enum.IntEnum):
    """What a draw is for; each domain is a disjoint sub-stream (the counter's fourth word)."""

    PERTURBATION = 0
    SUBSPACE_U = 1
    SUBSPACE_V = 2
    CORE = 3
    ROUNDING = 4
    DIZO = 5


class Distribution(enum.IntEnum):
    """How Philox words become values (docs/RANDOM.md): NORMAL and RADEMACHER (a sign per 32-bit word) take
    one word per element, RADEMACHER_BIT one bit per element."""

    NORMAL = 0
    RADEMACHER = 1
    RADEMACHER_BIT = 2


# The stream's version: raised whenever a change adds a distribution, changes any value drawn, or changes what a
# backend computes for a logged step; recorded in the seed log, so that a log is replayed only on a stream that
# draws what it was trained with, and said to replay close, not bitwise, where a backend has changed since.
STREAM_VERSION = 7
# The stream version that introduced each distribution.
DISTRIBUTION_SINCE = {Distribution.NORMAL: 1, Distribution.RADEMACHER: 1, Distribution.RADEMACHER_BIT: 2}
# The stream version since which a backend computes a logged step as it does now, where that is not version 1
# (docs/RANDOM.md): version 3 made the C++ kernels' low-rank sums (SubZero) fused multiply-adds, CPU and CUDA;
# version 4 evaluates the C++ CPU kernels' Box–Muller in float32, version 7 in fused multiply-adds with a
# division-free log.
VALUES_SINCE = {"cpp": 7, "cuda": 3}
# The stream version since which stochastic rounding to 16 bits takes 16-bit rounding words, eight per Philox call,
# on every backend (docs/RANDOM.md): a run that stored 16-bit tensors so replays close, not bitwise, from before.
ROUNDING_SINCE = 5
# The stream version since which the low-rank update of a bfloat16 matrix (SubZero) sums bfloat16 operands in blocks,
# on every backend (docs/OPS.md): a SubZero run over bfloat16 matrices so replays close, not bitwise, from before.
LOWRANK_BFLOAT16_SINCE = 6
# log2 of the elements one Philox call yields: element i comes from call i >> ELEMENTS_PER_CALL_LOG2[dist].
ELEMENTS_PER_CALL_LOG2 = {Distribution.NORMAL: 2, Distribution.RADEMACHER: 2, Distribution.RADEMACHER_BIT: 7}


def parse_distribution(dist: "str | int | Distribution") -> Distribution:
    if isinstance(dist, str):
        try:
            return Distribution[dist.upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(repr(d.name.lower()) for d in Distribution)
            raise ValueError(f"unknown distribution {dist!r}; expected one of {names}") from None
    try:
        return Distribution(int(dist))
    except ValueError:
        raise ValueError(f"unknown distribution {dist!r}; expected one of {[int(d) for d in Distribution]}") from None


def check_stream_version(version, dist: "str | int | Distribution" = Distribution.NORMAL) -> int:
    """A stream version this zokern draws, in which `dist` exists (a seed log's, for its run's distribution)."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STREAM_VERSION:
        raise ValueError(f"random stream version {version!r} is not one this zokern draws (1 to {STREAM_VERSION})")
    dist = parse_distribution(dist)
    if DISTRIBUTION_SINCE[dist] > version:
        raise ValueError(f"distribution {dist.name.lower()!r} does not exist in random stream version {version} "
                         f"(it was added in version {DISTRIBUTION_SINCE[dist]})")
    return version


def replay_changes(version: int, backends: Iterable[str], rounds_16_bit_stochastically: bool,
                   updates_bfloat16_low_rank: bool = False) -> list[str]:
    """What has changed since stream `version` for a run on `backends` (the run's own) that may make its replay
    close, not bitwise: one sentence per change, empty where the replay is sure to be bitwise. A backend that
    computes differently since (VALUES_SINCE), asked of every run on it since a log does not say which ops its
    method ran; other rounding words (ROUNDING_SINCE), for a run that rounds 16-bit tensors stochastically; other
    low-rank sums (LOWRANK_BFLOAT16_SINCE), for a run whose method updates bfloat16 matrices by low rank."""
    changes = []
    if rounds_16_bit_stochastically and version < ROUNDING_SINCE:
        changes.append(f"stochastic rounding to 16 bits takes other rounding words since version {ROUNDING_SINCE}")
    if updates_bfloat16_low_rank and version < LOWRANK_BFLOAT16_SINCE:
        changes.append("the low-rank update of a bfloat16 matrix sums bfloat16 operands since version "
                       f"{LOWRANK_BFLOAT16_SINCE}")
    for backend in sorted(set(backends)):
        if version < VALUES_SINCE.get(backend, 1):
            changes.append(f"backend {backend!r} computes differently since version {VALUES_SINCE[backend]}")
    return changes


def check_seed(seed: int, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{what} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what} must be in [0, 2**63), got {seed}")
    return seed


def check_stream(stream: int, what: str = "stream id") -> int:
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"{what} must be an int, got {type(stream).__name__}")
    if not 0 <= stream < STREAM_LIMIT:
        raise ValueError(f"{what} must be in [0, 2**32), got {stream}")
    return stream


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a·m for a < 2^32, exact in int64 by splitting m into 16-bit halves."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_hi = a * m_hi  # < 2^48
    p_lo = a * m_lo  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(counter: "tuple[torch.Tensor | int, ...]", key: "tuple[int, int]", rounds: int = PHILOX_ROUNDS):
    """Philox4x32-R on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_calls(seed: int, stream: int, domain: int, calls: torch.Tensor):
    """The four words of Philox calls `calls` (int64 call indices) of stream (seed, stream, domain): the counter
    is (call low, call high, stream, domain) and the key the seed's two halves (docs/RANDOM.md)."""
    return philox4x32((calls & MASK32, calls >> 32, stream, int(domain)), (seed & MASK32, seed >> 32))


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = ((a >> 8) + 1).to(torch.float32) * 2.0**-24
    t = (b >> 8).to(torch.float32) * TWO_PI_2M24
    r = torch.sqrt(-2.0 * torch.log(u))
    return r * torch.cos(t), r * torch.sin(t)


def _rademacher(w: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * (w >> 31).to(torch.float32)


def _rademacher_bits(words: "tuple[torch.Tensor, ...]") -> torch.Tensor:
    """The 128 signs of each call, in element order: bit b (LSB first) of word q is element 32·q + b."""
    bits = torch.stack(words, dim=-1)[..., None] >> torch.arange(32, dtype=torch.int64, device=words[0].device)
    return 1.0 - 2.0 * (bits & 1).to(torch.float32).reshape(-1)


def reference_draw(seed: int, stream: int, numel: int, offset: int = 0, domain: int = Domain.PERTURBATION,
                   dist: "str | int | Distribution" = Distribution.NORMAL,
                   device: "torch.device | str" = "cpu") -> torch.Tensor:
    """Elements offset … offset+numel−1 of stream (seed, stream, domain), float32, computed in PyTorch."""
    check_seed(seed)
    check_stream(stream)
    check_stream(int(domain), "domain")
    dist = parse_distribution(dist)
    if numel < 0 or offset < 0:
        raise ValueError(f"numel and offset must be non-negative, got numel={numel}, offset={offset}")
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    shift = ELEMENTS_PER_CALL_LOG2[dist]
    j = torch.arange(offset >> shift, ((offset + numel - 1) >> shift) + 1, dtype=torch.int64, device=device)
    words = philox_calls(seed, stream, domain, j)
    if dist is Distribution.NORMAL:
        n0, n1 = _box_muller(words[0], words[1])
        n2, n3 = _box_muller(words[2], words[3])
        values = torch.stack((n0, n1, n2, n3), dim=-1).reshape(-1)
    elif dist is Distribution.RADEMACHER:
        values = torch.stack([_rademacher(w) for w in words], dim=-1).reshape(-1)
    else:
        values = _rademacher_bits(words)
    start = offset & ((1 << shift) - 1)
    return values[start:start + numel]


def step_seed(base_seed: int, step: int) -> int:
    """The seed of ZO step `step` of a run seeded with `base_seed` (SplitMix64, 63 bits): a run's seeds
    are a function of (base_seed, step) alone, so a resumed run draws what an uninterrupted one would."""
    x = (check_seed(base_seed) * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1
