"""SubZero's low-rank perturbations P = μ·U·Z0·Vᵀ, applied without materialising the m×n product."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from zokern.library import call
from zokern.ops.mezo import rounding_keys
from zokern.ops.random import fill_random_
from zokern.random import Distribution, Domain
from zokern.validation import Rounding, check_is_tensor_list


def lowrank_shape(shape: Sequence[int], reshape: bool = False) -> "tuple[int, int] | None":
    """The (m, n) a tensor is perturbed as, or None for the plain stream (vectors, scalars).

    A tensor that is 2-D after squeeze keeps its shape; one with more dimensions, or any tensor when
    `reshape` is set (LoRA and prefix tensors), becomes the most-square factorisation of its element
    count (SubZero's rule: 8×5120 → 160×256)."""
    dims = [d for d in shape if d != 1]
    if len(dims) == 2 and not reshape:
        return dims[0], dims[1]
    if len(dims) < 2 and not reshape:
        return None
    numel = math.prod(shape)
    m = next(d for d in range(math.isqrt(numel), 0, -1) if numel % d == 0)
    return (m, numel // m) if m > 1 else None


def lowrank_scale(m: int, n: int, rank: int) -> float:
    """μ = √(mn)/r: SubZero's norm alignment, so that MeZO's lr and ε carry over."""
    return math.sqrt(m * n) / rank


def _orthonormal(seed: int, stream: int, rows: int, rank: int, domain: Domain, device, backend) -> torch.Tensor:
    gaussian = fill_random_(torch.empty(rows, rank, device=device), seed, stream, domain=domain, backend=backend)
    q, r = torch.linalg.qr(gaussian)
    # Make the factorisation unique (diag(R) > 0), so U and V do not depend on the QR implementation's signs.
    # Row-major: LAPACK's Q is column-major, and the kernels would copy it at every pass of the window.
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).contiguous()


def subspace_factors(seed: int, stream: int, m: int, n: int, rank: int, *, dtype=torch.float32, device="cpu",
                     backend: "str | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-orthonormal U (m×r) and V (n×r) of the reduced QR of Gaussian draws from domains SUBSPACE_U and
    SUBSPACE_V under (seed, stream): a subspace is reproducible from the window's seed and the tensor id."""
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    u = _orthonormal(seed, stream, m, rank, Domain.SUBSPACE_U, device, backend)
    v = _orthonormal(seed, stream, n, rank, Domain.SUBSPACE_V, device, backend)
    return u.to(dtype), v.to(dtype)


def core_matrix(seed: int, stream: int, rank: int, *, dist: "str | Distribution" = "normal", device="cpu",
                backend: "str | None" = None) -> torch.Tensor:
    """Z0: the r×r core of step `seed` for tensor `stream` (domain CORE), float32: Gaussian as the authors', or
    ±1 signs with a Rademacher `dist`."""
    return fill_random_(torch.empty(rank, rank, device=device), seed, stream, domain=Domain.CORE, dist=dist,
                        backend=backend)


def lowrank_apply_(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                   cores: Sequence[torch.Tensor], *, rounding: "str | Rounding" = "nearest",
                   seed: "int | None" = None, stream_ids: "Sequence[int] | None" = None,
                   offsets: "Sequence[int] | None" = None, backend: "str | None" = None) -> None:
    """W += U·C·Vᵀ for every (W, U, V, C), in place, tile by tile (docs/OPS.md).

    rounding "stochastic" rounds 16-bit W stochastically, keyed by (seed, stream id, offset + row-major index)
    (docs/RANDOM.md): it needs the step's seed and the tensors' stream ids; offsets (default 0) as for
    perturb_."""
    weights = check_is_tensor_list(list(weights))
    if not weights:
        return
    keys = rounding_keys(rounding, seed, stream_ids, offsets)
    with torch.no_grad():
        call("lowrank_apply_", weights, list(us), list(vs), list(cores), backend or "", *keys)
