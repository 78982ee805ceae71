"""SubZero's low-rank update W += U·C·Vᵀ (docs/OPS.md, "Low-rank perturbation"), tile by tile.

A program owns BM rows of W and a run of COLS columns. It loads its U rows (BM × R_PAD, the rank padded
with zeros to a power of two ≥ 16, the smallest K tl.dot takes on GPU), forms U·C once, then walks its
columns BN at a time: (U·C)·V_tileᵀ in float32, added to the W tile and stored with round-to-nearest-even.
For a bfloat16 W the dot takes U·C and V tiles of bfloat16 operands (docs/OPS.md), summed in the dot's own order.
Nothing of size m×n exists outside the tiles. One launch per matrix (matrices are large).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import CODES, RoundingScalars, cdiv, device_ctx, i32, kernel_arg, launch_options, stochastic
from .philox import INTERPRET
from .mezo import BFLOAT16, _load_f32, rounding_words, store_rounded

# "ieee" dots: float32 products and sums on the FMA units, also on GPU. The tensor-core forms ("tf32x3", three
# tf32 products) are what would keep a 16-bit W at r = 64 memory-bound on an H100/H200, but triton 3.6.0 compiles
# this kernel's two dots (U·C, then (U·C)·Vᵀ in the loop) for Hopper's wgmma into code that reads out of bounds
# (illegal memory access, measured on an H200) and, where it ran, was up to 2e-3 outside the float32 error bound.
# The CUDA backend's tiles are the fast low-rank path on GPU.
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def _load_f32_zero(ptr, mask, DTYPE: tl.constexpr):
    """Like mezo._load_f32, with masked-off lanes 0: tl.dot must not see garbage in the padding."""
    if DTYPE == BFLOAT16:
        return (tl.load(ptr, mask=mask, other=0).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _lowrank_operand(x):
    """A bfloat16 W's low-rank operands (docs/OPS.md; element.h's lowrank_operand_bits): rounded to bfloat16,
    nearest even, in bits (the interpreter's float conversion does not round so), zero below 2^-51 (bits 0x2600)."""
    u = x.to(tl.uint32, bitcast=True)
    b = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FFF, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    b = tl.where((b & 0x7FFF) < 0x2600, 0, b)
    return (b << 16).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["k0", "k1", "stream", "offset"])
def subzero_kernel(w, u, v, c, m, n, r, k0, k1, stream, offset, W_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr,
                   V_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   R_PAD: tl.constexpr, COLS: tl.constexpr):
    """W (m×n) += U (m×r) · C (r×r, float32) · Vᵀ (V n×r); all row-major contiguous. Offsets within a tile
    are int32 (the launcher checks BM·n < 2^31); only the tiles' base offsets are int64, which keeps
    per-element pointer arithmetic (and registers) at 32 bits. STOCHASTIC: W's element (i, j) is stored with
    stochastic rounding keyed by stream element offset + i·n + j under seed (k0, k1) (int32 bit patterns)."""
    row0 = tl.program_id(0) * BM
    rows = tl.arange(0, BM)
    ks = tl.arange(0, R_PAD)
    row_in = rows < m - row0
    k_in = ks < r
    u_tile = _load_f32_zero(u + row0.to(tl.int64) * r + (rows[:, None] * r + ks[None, :]),
                            row_in[:, None] & k_in[None, :], U_DTYPE)
    core = tl.load(c + ks[:, None] * r + ks[None, :], mask=k_in[:, None] & k_in[None, :], other=0.0)
    uc = tl.dot(u_tile, core, input_precision=DOT_PRECISION)
    if W_DTYPE == BFLOAT16:
        uc = _lowrank_operand(uc)
    w_rows = w + row0.to(tl.int64) * n
    first = tl.program_id(1) * COLS
    last = tl.minimum(n, first + COLS)
    cols = tl.arange(0, BN)
    for off in range(0, last - first, BN):  # over offsets: the interpreter's loop variable is a Python int
        col0 = first + off
        col_in = cols < last - col0
        # V rows are contiguous: load the tile as [BN, R_PAD] (coalesced) and let the dot transpose it.
        v_tile = _load_f32_zero(v + col0.to(tl.int64) * r + (cols[:, None] * r + ks[None, :]),
                                col_in[:, None] & k_in[None, :], V_DTYPE)
        if W_DTYPE == BFLOAT16:
            v_tile = _lowrank_operand(v_tile)
        update = tl.dot(uc, tl.trans(v_tile), input_precision=DOT_PRECISION)
        ptr = w_rows + col0 + (rows[:, None] * n + cols[None, :])
        inside = row_in[:, None] & col_in[None, :]
        if STOCHASTIC:
            element = offset.to(tl.int64) + (row0 + rows).to(tl.int64)[:, None] * n + (col0 + cols)[None, :]
            words = rounding_words(element, stream.to(tl.uint32, bitcast=True), k0.to(tl.uint32, bitcast=True),
                                   k1.to(tl.uint32, bitcast=True))
        else:
            words = 0
        store_rounded(ptr, _load_f32(ptr, inside, W_DTYPE) + update, inside, words, W_DTYPE, STOCHASTIC)


def _tiles(n: int, rank: int, stochastic: bool) -> tuple[int, int, int, int, dict]:
    """(BM, BN, R_PAD, COLS, launch options)."""
    r_pad = max(16, triton.next_power_of_2(rank))
    if INTERPRET:
        # Each interpreted op costs the same whatever its size: few, big tiles, one program per row block.
        bn = 256
        return 128, bn, r_pad, bn * cdiv(n, bn), {}
    # Register budget (ptxas for sm_90, FMA dots, 8 warps; scripts/compile_triton.py with triton 3.9.0): U·C
    # stays in registers across the column loop as the dot's A operand, so BM·R_PAD sets the pressure. With n
    # divisible by 16 (Triton specialises on it) 64×64 tiles take 64–183 registers, spill 24 bytes at most and
    # move W in 16-byte vectors; for other n, up to 320 bytes spill at R_PAD = 64. BM shrinks for larger ranks
    # (BM ≥ 16 for tl.dot). Four column tiles per program amortise forming U·C (BM·r² flops) over 4·BM·BN·r.
    # Stochastic rounding draws a Philox call per element of the W tile: half the rows keep it from spilling.
    bm = max(16, min(64, (2048 if stochastic else 4096) // r_pad))
    bn = 64
    return bm, bn, r_pad, 4 * bn, {**launch_options(), "num_warps": 8}


def lowrank_apply(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor],
                  cores: list[torch.Tensor], streams: list[int] = (), seed: int = 0, offsets: list[int] = (),
                  rounding: int = 0) -> None:
    scalars = RoundingScalars(seed, rounding)
    for t, (w, u, v, core) in enumerate(zip(weights, us, vs, cores)):
        (m, n), rank = w.shape, u.shape[1]
        if w.numel() == 0 or rank == 0:
            continue
        rounds = stochastic(scalars.rounding, w.dtype)
        bm, bn, r_pad, cols, options = _tiles(n, rank, rounds)
        if bm * n >= 1 << 31:
            raise ValueError(f"lowrank_apply: {n} columns exceed the kernel's int32 tile offsets")
        stream, offset = (streams[t] if streams else 0), (offsets[t] if offsets else 0)
        with device_ctx(w.device):
            subzero_kernel[(cdiv(m, bm), cdiv(n, cols))](
                kernel_arg(w), kernel_arg(u), kernel_arg(v), core, m, n, rank, *scalars.kernel_args(), i32(stream),
                offset,
                W_DTYPE=CODES[w.dtype], U_DTYPE=CODES[u.dtype], V_DTYPE=CODES[v.dtype],
                STOCHASTIC=rounds, BM=bm, BN=bn, R_PAD=r_pad, COLS=cols, **options)
