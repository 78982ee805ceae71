"""Reference backend: the fused ops written as plain PyTorch from docs/OPS.md. It is the test oracle.

Each function takes its op's arguments (zokern/library.py SCHEMAS) but the backend."""
from __future__ import annotations

import torch

from zokern.random import MASK32, Domain, philox_calls, reference_draw
from zokern.validation import Rounding, offsets_or_zeros

# The one NaN every backend stores in bfloat16 and float16, whatever NaN the float32 math produced (docs/OPS.md).
CANONICAL_NAN_16 = 0x7FFF


def availability(device_type: str) -> tuple[bool, str]:
    return True, "plain PyTorch, runs on every device"


def _z(seed: int, stream: int, p: torch.Tensor, dist: int, offset: int) -> torch.Tensor:
    """z of p's elements: stream elements offset … offset + numel − 1."""
    return reference_draw(seed, stream, p.numel(), offset, domain=Domain.PERTURBATION, dist=dist,
                          device=p.device).view(p.shape)


def _store(p: torch.Tensor, x: torch.Tensor, rounding: int = Rounding.NEAREST, seed: int = 0, stream: int = 0,
           offset: int = 0) -> None:
    """p ← x rounded to nearest even in p's dtype, with every NaN stored as the canonical NaN 0x7FFF in bfloat16 and
    float16 (docs/OPS.md): torch's own conversion has no single rule (on the CPU bfloat16 gets 0xFFFF and float16
    the quieted payload and sign; on CUDA, the conversion instructions' canonical NaN). With stochastic rounding,
    16-bit storage takes the rounding of docs/RANDOM.md keyed by (seed, stream, offset + element index)."""
    if rounding == Rounding.STOCHASTIC and p.dtype in (torch.bfloat16, torch.float16):
        words = _rounding_words(seed, stream, offset, p.numel(), p.device)
        bits = _stochastic_bits(x.float().reshape(-1), words, p.dtype)
        p.view(torch.int16).copy_(((bits ^ 0x8000) - 0x8000).to(torch.int16).view(p.shape))  # uint16 as int16
        return
    p.copy_(x)
    if p.dtype in (torch.bfloat16, torch.float16):
        p.view(torch.int16).masked_fill_(p.isnan(), CANONICAL_NAN_16)


def _rounding_words(seed: int, stream: int, offset: int, numel: int, device) -> torch.Tensor:
    """The rounding words of stream elements offset … offset + numel − 1 (int64 holding 16 bits): half i & 1
    (the low one first) of word (i >> 1) & 3 of Philox call i >> 3 in domain ROUNDING."""
    j = torch.arange(offset >> 3, ((offset + numel - 1) >> 3) + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox_calls(seed, stream, Domain.ROUNDING, j), dim=-1).reshape(-1)
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=-1).reshape(-1)
    return halves[offset & 7:(offset & 7) + numel]


def _stochastic_bits(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit patterns (int64) of float32 x rounded stochastically to dtype with rounding words r
    (docs/RANDOM.md, "Stochastic rounding"): integer arithmetic on x's bit pattern."""
    u = x.view(torch.int32).to(torch.int64) & MASK32
    if dtype == torch.bfloat16:
        out = (u + (r & 0xFFFF)) >> 16
    else:
        sign, a = (u >> 16) & 0x8000, u & 0x7FFFFFFF
        e = a >> 23
        normal = (a - (112 << 23) + (r & 0x1FFF)) >> 13
        s = torch.where(e == 0, 125, 126 - e)  # float16 subnormals: the value in units of 2^-24 is m / 2^s
        t = s.clamp(max=16)
        m = torch.where(e == 0, a & 0x7FFFFF, (a & 0x7FFFFF) | 0x800000) >> (s - t).clamp(max=31)
        subnormal = (m + (r & ((1 << t) - 1))) >> t
        out = sign | torch.where(a >= 0x47800000, 0x7C00, torch.where(e >= 113, normal, subnormal))
    return torch.where((u & 0x7FFFFFFF) > 0x7F800000, CANONICAL_NAN_16, out)


def philox_words(out: torch.Tensor, seed: int, stream: int, domain: int, first_call: int) -> None:
    """out[k] = the four words of Philox call first_call + k (as int64, one row per call)."""
    j = torch.arange(first_call, first_call + out.shape[0], dtype=torch.int64, device=out.device)
    out.copy_(torch.stack(philox_calls(seed, stream, domain, j), dim=-1))


def fill_random(out: torch.Tensor, seed: int, stream: int, offset: int, domain: int, dist: int) -> None:
    out.copy_(reference_draw(seed, stream, out.numel(), offset, domain, dist, device=out.device).view(out.shape))


def perturb(params: list[torch.Tensor], streams: list[int], seed: int, scale: float, dist: int,
            offsets: list[int] = ()) -> None:
    for p, stream, offset in zip(params, streams, offsets_or_zeros(offsets, len(params))):
        x = p.float() + scale * _z(seed, stream, p, dist, offset)
        _store(p, x)


def fused_step(params: list[torch.Tensor], streams: list[int], seed: int, restore: float, lr: float, grad: float,
               weight_decays: list[float], next_seed: int, next_scale: float, dist: int,
               offsets: list[int] = (), rounding: int = Rounding.NEAREST) -> None:
    for p, stream, wd, offset in zip(params, streams, weight_decays, offsets_or_zeros(offsets, len(params))):
        z = _z(seed, stream, p, dist, offset)
        x = p.float() + restore * z
        x = x - lr * (grad * z + wd * x)
        if next_seed >= 0:
            x = x + next_scale * _z(next_seed, stream, p, dist, offset)
        _store(p, x, rounding, seed, stream, offset)


# --- low-rank (SubZero) -----------------------------------------------------------------------------

# Below this magnitude a bfloat16 low-rank operand counts as zero (docs/OPS.md, element.h's lowrank_operand).
LOWRANK_OPERAND_FLUSH = 2.0 ** -51


def lowrank_operand(x: torch.Tensor) -> torch.Tensor:
    """A bfloat16 W's low-rank operands (U·C and V) as float32: rounded to bfloat16, zero below 2^-51."""
    b = x.float().to(torch.bfloat16).float()
    return torch.where(b.abs() < LOWRANK_OPERAND_FLUSH, torch.zeros_like(b), b)


def lowrank_apply(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor],
                  cores: list[torch.Tensor], streams: list[int] = (), seed: int = 0, offsets: list[int] = (),
                  rounding: int = Rounding.NEAREST) -> None:
    """W += U·C·Vᵀ per tensor (W m×n, U m×r, V n×r, C r×r float32); the oracle may materialise U·C·Vᵀ. A bfloat16
    W takes U·C and V as lowrank_operand values."""
    for w, u, v, c, stream, offset in zip(weights, us, vs, cores, offsets_or_zeros(streams, len(weights)),
                                          offsets_or_zeros(offsets, len(weights))):
        uc, vf = u.float() @ c, v.float()
        if w.dtype == torch.bfloat16:
            uc, vf = lowrank_operand(uc), lowrank_operand(vf)
        _store(w, w.float() + uc @ vf.t(), rounding, seed, stream, offset)


# --- magnitude mask (Sparse MeZO) --------------------------------------------------------------------

def _unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    bits = torch.arange(32, device=mask.device, dtype=torch.int64)
    return (((mask.to(torch.int64).unsqueeze(-1) >> bits) & 1).reshape(-1)[:numel]).bool()


def _pack_mask(m: torch.Tensor, mask: torch.Tensor) -> None:
    padded = torch.zeros(mask.numel() * 32, dtype=torch.int64, device=m.device)
    padded[:m.numel()] = m.reshape(-1).to(torch.int64)
    words = (padded.view(-1, 32) << torch.arange(32, device=m.device, dtype=torch.int64)).sum(-1)
    mask.copy_(((words + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32))  # uint32 bits as int32


def masked_perturb(params, masks, thresholds, streams, seed, scale, compute_mask, dist, offsets=()) -> None:
    for t, (p, mask, stream, offset) in enumerate(zip(params, masks, streams, offsets_or_zeros(offsets, len(params)))):
        if compute_mask:
            _pack_mask(p.float().abs() <= thresholds[t], mask)
        m = _unpack_mask(mask, p.numel()).view(p.shape)
        _store(p, p.float() + scale * (m * _z(seed, stream, p, dist, offset)))


def masked_fused_step(params, masks, thresholds, streams, seed, restore, lr, grad, weight_decays, next_seed,
                      next_scale, dist, offsets=(), rounding=Rounding.NEAREST) -> None:
    for t, (p, mask, stream, wd, offset) in enumerate(zip(params, masks, streams, weight_decays,
                                                          offsets_or_zeros(offsets, len(params)))):
        mz = _unpack_mask(mask, p.numel()).view(p.shape) * _z(seed, stream, p, dist, offset)
        x = p.float() + restore * mz
        x = x - lr * (grad * mz + wd * x)
        if next_seed >= 0:
            # The next mask comes from the weights this step would store; the next perturbation is then
            # rounded as masked_perturb_ rounds (to nearest).
            stored = torch.empty_like(p)
            _store(stored, x, rounding, seed, stream, offset)
            m_next = stored.float().abs() <= thresholds[t]
            _pack_mask(m_next, mask)
            _store(p, stored.float() + next_scale * (m_next * _z(next_seed, stream, p, dist, offset)))
        else:
            _store(p, x, rounding, seed, stream, offset)


# --- diagonal Hessian (HiZOO) ------------------------------------------------------------------------

def hessian_perturb(params, hessians, streams, seed, scale, dist, offsets=()) -> None:
    for p, d, stream, offset in zip(params, hessians, streams, offsets_or_zeros(offsets, len(params))):
        _store(p, p.float() + scale * (_z(seed, stream, p, dist, offset) / torch.sqrt(d.float())))


def hessian_step(params, hessians, streams, seed, restore, lr, grad, hess_scale, alpha, weight_decays, next_seed,
                 next_scale, dist, offsets=(), rounding=Rounding.NEAREST) -> None:
    for p, d, stream, wd, offset in zip(params, hessians, streams, weight_decays,
                                        offsets_or_zeros(offsets, len(params))):
        z = _z(seed, stream, p, dist, offset)
        d_old = d.float()
        x = p.float() + restore * (z / torch.sqrt(d_old))
        d_new = (1 - alpha) * d_old + alpha * (hess_scale * d_old * (z * z))
        x = x - lr * (grad * (z / torch.sqrt(d_new)) + wd * x)
        if next_seed >= 0:
            x = x + next_scale * (_z(next_seed, stream, p, dist, offset) / torch.sqrt(d_new))
        _store(p, x, rounding, seed, stream, offset)
        _store(d, d_new)


# --- anchored rescale (DiZO) -------------------------------------------------------------------------

def distance_norms(params, anchors) -> torch.Tensor:
    """‖θ − θ0‖_F per tensor, float32, accumulated in float32."""
    device = params[0].device if params else "cpu"
    return torch.stack([torch.linalg.vector_norm(p.float() - a.float()) for p, a in zip(params, anchors)]) \
        if params else torch.empty(0, device=device)


def anchored_rescale(params, anchors, sources, factors, streams=(), seed=0, offsets=(),
                     rounding=Rounding.NEAREST) -> None:
    """θ = θ0 + (src − θ0)·f per tensor; src defaults to θ itself."""
    sources = params if sources is None else sources
    for t, (p, a, s, stream, offset) in enumerate(zip(params, anchors, sources, offsets_or_zeros(streams, len(params)),
                                                      offsets_or_zeros(offsets, len(params)))):
        anchor = a.float()
        _store(p, anchor + (s.float() - anchor) * factors[t], rounding, seed, stream, offset)
