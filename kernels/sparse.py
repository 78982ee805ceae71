"""Sparse MeZO's masked perturb and masked fused step (docs/OPS.md, "Magnitude mask").

Multi-tensor like mezo.py: one launch per dtype. A program's chunk is a multiple of 32 elements, so
a mask word never straddles two programs. Blocks are [WORDS, 32]: row w is mask word w, column b its bit
b, i.e. element 32w + b. Mask words are built as uint32 (a sum of distinct bits << b, so bit 31 lands in
the sign of the int32 word by bitcast) and read back with logical shifts. Mask words follow the tensor's own
elements; an element offset moves only the draws (mezo.draw_shifted when it is not a multiple of 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (CODES, StepScalars, alignment, default_sizes, extras, launch_groups, launch_options,
                           round_to, stochastic)
from .mezo import (PERTURBATION, _load_f32, _pointer, chunk_of_program, draw_shifted, rounding_rows, seed_keys,
                   shifted, store_rounded)


@triton.jit(do_not_specialize=["k0", "k1", "nk0", "nk1"])
def sparse_kernel(tensors, extra, chunks, thresholds, weight_decays, chunk, k0, k1, restore, lr, grad, nk0, nk1,
                  next_scale, DTYPE: tl.constexpr, DIST: tl.constexpr, FUSED: tl.constexpr,
                  COMPUTE_MASK: tl.constexpr, HAS_NEXT: tl.constexpr, SHIFTED: tl.constexpr,
                  STOCHASTIC: tl.constexpr, ALIGNED_PTRS: tl.constexpr, ALIGNED_ENDS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """perturb (FUSED=False): x + restore·(m·z) with restore = scale; m = |x| ≤ h written to the bitmask if
    COMPUTE_MASK, else read from it. fused step (FUSED=True): restore and update with the stored mask; with
    HAS_NEXT the next mask from the rounded result, written, then the next perturbation under it. STOCHASTIC
    (16-bit DTYPE): the update is rounded stochastically (without HAS_NEXT, as stored; with it, before the next
    mask, and the perturbed result is then stored to nearest). `extra` rows: (index into thresholds, mask
    address). SHIFTED=False promises every offset is a multiple of 4."""
    WORDS: tl.constexpr = BLOCK // 32
    t, addr, stream, start, end, offset = chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS)
    h = tl.load(thresholds + tl.load(extra + 2 * t))
    mask_ptr = tl.load(extra + 2 * t + 1).to(tl.pointer_type(tl.int32))
    ptr0 = _pointer(addr, DTYPE, ALIGNED_PTRS)
    key0, key1, next_key0, next_key1 = seed_keys(k0, k1, nk0, nk1)
    if FUSED:
        wd = tl.load(weight_decays + t)
    rows = tl.arange(0, WORDS)
    bits = tl.arange(0, 32).to(tl.uint32)[None, :]
    calls = tl.arange(0, BLOCK // 4)
    for off in range(0, end - start, BLOCK):
        base = start + off
        w = (base >> 5) + rows                      # mask word (int64)
        i = (w * 32)[:, None] + bits.to(tl.int64)
        inside = i < end
        word_inside = w * 32 < end
        ptr = ptr0 + i
        x = _load_f32(ptr, inside, DTYPE)
        # Row r, column q of a draw is element 4·r + q of the block; row-major reshape keeps the order.
        j = ((offset + base) >> 2) + calls
        z = tl.reshape(draw_shifted(j, offset & 3, stream, PERTURBATION, key0, key1, DIST, SHIFTED), (WORDS, 32))
        if COMPUTE_MASK:
            m = (tl.abs(x) <= h) & inside
            tl.store(mask_ptr + w, tl.sum(m.to(tl.uint32) << bits, axis=1).to(tl.int32, bitcast=True),
                     mask=word_inside)
        else:
            word = tl.load(mask_ptr + w, mask=word_inside, other=0).to(tl.uint32, bitcast=True)
            m = ((word[:, None] >> bits) & 1) != 0
        mz = m.to(tl.float32) * z
        x = x + restore * mz
        if STOCHASTIC:
            r = rounding_rows(j, stream, key0, key1)
            if SHIFTED:
                r = shifted(r, rounding_rows(j + 1, stream, key0, key1), offset & 3)
            r = tl.reshape(r, (WORDS, 32))
        else:
            r = 0
        if FUSED:
            x = x - lr * (grad * mz + wd * x)
            if HAS_NEXT:
                x = round_to(x, r, DTYPE, STOCHASTIC)
                m_next = (tl.abs(x) <= h) & inside
                tl.store(mask_ptr + w, tl.sum(m_next.to(tl.uint32) << bits, axis=1).to(tl.int32, bitcast=True),
                         mask=word_inside)
                z_next = tl.reshape(draw_shifted(j, offset & 3, stream, PERTURBATION, next_key0, next_key1, DIST,
                                                 SHIFTED), (WORDS, 32))
                x = x + next_scale * (m_next.to(tl.float32) * z_next)
        store_rounded(ptr, x, inside, r, DTYPE, STOCHASTIC and not HAS_NEXT)


def _launch(params, masks, thresholds, streams, weight_decays, offsets, dist, scalars: StepScalars, compute_mask,
            block, chunk) -> None:
    """One sparse_kernel launch per dtype; weight_decays None: a perturbation."""
    block, chunk = default_sizes(block, chunk)
    if block < 32 or chunk % 32:
        raise ValueError(f"sparse kernels need block >= 32 and chunk a multiple of 32, got {block}, {chunk}")
    if not all(m.is_contiguous() for m in masks):
        raise ValueError("masks must be contiguous int32 tensors")
    fused = weight_decays is not None
    for dtype, idxs, group, tensors, wds, chunks in launch_groups(params, lambda i: params[i].dtype, streams,
                                                                  weight_decays, chunk, offsets):
        extra = extras([(i, masks[i].data_ptr()) for i in idxs], group[0].device)
        # The mask's blocks follow the tensor's own elements, so the alignment promises are offset-free.
        sparse_kernel[(chunks.numel(),)](
            tensors, extra, chunks, thresholds, wds if fused else tensors, chunk, *scalars.kernel_args(),
            DTYPE=CODES[dtype], DIST=int(dist), FUSED=fused, COMPUTE_MASK=compute_mask, HAS_NEXT=scalars.has_next,
            SHIFTED=any(offsets[i] % 4 for i in idxs) if offsets else False,
            STOCHASTIC=stochastic(scalars.rounding, dtype), BLOCK=block, **alignment(group), **launch_options())


def masked_perturb(params: list[torch.Tensor], masks: list[torch.Tensor], thresholds: torch.Tensor,
                   streams: list[int], seed: int, scale: float, compute_mask: bool, dist: int,
                   offsets: list[int] = (), *, block: "int | None" = None, chunk: "int | None" = None) -> None:
    _launch(params, masks, thresholds, streams, None, offsets, dist, StepScalars(seed, scale), bool(compute_mask),
            block, chunk)


def masked_fused_step(params: list[torch.Tensor], masks: list[torch.Tensor], thresholds: torch.Tensor,
                      streams: list[int], seed: int, restore: float, lr: float, grad: float,
                      weight_decays: list[float], next_seed: int, next_scale: float, dist: int,
                      offsets: list[int] = (), rounding: int = 0, *, block: "int | None" = None,
                      chunk: "int | None" = None) -> None:
    _launch(params, masks, thresholds, streams, weight_decays, offsets, dist,
            StepScalars(seed, restore, lr, grad, next_seed, next_scale, rounding), False, block, chunk)
