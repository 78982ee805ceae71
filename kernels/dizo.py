"""DiZO's distance norms and anchored rescale (docs/OPS.md, "Anchored rescale").

Multi-tensor like mezo.py, one launch per dtype. distance_norms is deterministic without atomics:
every program writes the fp32 sum of squares of its chunk to its own slot of a partials buffer (slots of a
tensor are consecutive, from its first chunk), then a second kernel, one program per tensor, sums the
tensor's slots in a fixed order and takes the square root.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (CODES, RoundingScalars, alignment, default_sizes, device_ctx, extras, groups, launch_groups,
                           launch_options, stochastic, tables)
from .mezo import ROW, _load_f32, _pointer, chunk_of_program, rounding_words, seed_keys, store_rounded


@triton.jit
def dizo_square_sums_kernel(tensors, extra, chunks, partials, chunk, DTYPE: tl.constexpr, ALIGNED_PTRS: tl.constexpr,
                       ALIGNED_ENDS: tl.constexpr, BLOCK: tl.constexpr):
    """partials[pid] = Σ (θ − θ0)² over this program's chunk, in float32. `extra` rows: (anchor address,
    index into the output)."""
    t, addr, _, start, end, _ = chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS)
    ptr0 = _pointer(addr, DTYPE, ALIGNED_PTRS)
    anchor0 = _pointer(tl.load(extra + 2 * t), DTYPE, ALIGNED_PTRS)
    acc = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, end - start, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        inside = i < end
        diff = _load_f32(ptr0 + i, inside, DTYPE) - _load_f32(anchor0 + i, inside, DTYPE)
        acc += tl.where(inside, diff * diff, 0.0)
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def dizo_norms_kernel(tensors, extra, partials, out, chunk, BLOCK: tl.constexpr):
    """out[index of tensor t] = sqrt(Σ of tensor t's partials), one program per tensor; `extra` as for
    dizo_square_sums_kernel."""
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(tensors + ROW * t + 3)
    count = tl.cdiv(tl.load(tensors + ROW * t + 1), chunk)
    acc = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, count, BLOCK):
        k = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + first + k, mask=k < count, other=0.0)
    tl.store(out + tl.load(extra + 2 * t + 1), tl.sqrt_rn(tl.sum(acc, axis=0)))


@triton.jit(do_not_specialize=["k0", "k1"])
def dizo_rescale_kernel(tensors, extra, chunks, factors, chunk, k0, k1, DTYPE: tl.constexpr,
                            STOCHASTIC: tl.constexpr, ALIGNED_PTRS: tl.constexpr, ALIGNED_ENDS: tl.constexpr,
                            BLOCK: tl.constexpr):
    """θ = θ0 + (src − θ0)·f, stored with stochastic rounding keyed by (seed (k0, k1), stream, offset + index) if
    STOCHASTIC. `extra` rows: (index into factors, anchor address, source address); without sources the source
    address is θ's own."""
    t, addr, stream, start, end, offset = chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS)
    key0, key1, _, _ = seed_keys(k0, k1, k0, k1)
    ptr0 = _pointer(addr, DTYPE, ALIGNED_PTRS)
    anchor0 = _pointer(tl.load(extra + 3 * t + 1), DTYPE, ALIGNED_PTRS)
    source0 = _pointer(tl.load(extra + 3 * t + 2), DTYPE, ALIGNED_PTRS)
    f = tl.load(factors + tl.load(extra + 3 * t))
    for off in range(0, end - start, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        inside = i < end
        anchor = _load_f32(anchor0 + i, inside, DTYPE)
        src = _load_f32(source0 + i, inside, DTYPE)
        if STOCHASTIC:
            words = rounding_words(offset + i, stream, key0, key1)
        else:
            words = 0
        store_rounded(ptr0 + i, anchor + (src - anchor) * f, inside, words, DTYPE, STOCHASTIC)


# Partials summed per step of dizo_norms_kernel: a tensor has numel / chunk of them, few enough for one block.
_PARTIALS_BLOCK = 1024


def distance_norms(params: list[torch.Tensor], anchors: list[torch.Tensor], *, block: "int | None" = None,
                   chunk: "int | None" = None) -> torch.Tensor:
    block, chunk = default_sizes(block, chunk)
    device = params[0].device if params else torch.device("cpu")
    out = torch.zeros(len(params), dtype=torch.float32, device=device)
    with device_ctx(device):
        for dtype, idxs in groups(params, lambda i: params[i].dtype).items():
            group = [params[i] for i in idxs]
            tensors, _, chunks = tables(group, [0] * len(idxs), None, chunk, device)
            extra = extras([(anchors[i].data_ptr(), i) for i in idxs], device)
            partials = torch.empty(chunks.numel(), dtype=torch.float32, device=device)
            dizo_square_sums_kernel[(chunks.numel(),)](
                tensors, extra, chunks, partials, chunk, DTYPE=CODES[dtype],
                BLOCK=block, **alignment(group + [anchors[i] for i in idxs]), **launch_options())
            dizo_norms_kernel[(len(idxs),)](tensors, extra, partials, out, chunk, BLOCK=_PARTIALS_BLOCK,
                                       **launch_options())
    return out


def anchored_rescale(params: list[torch.Tensor], anchors: list[torch.Tensor],
                     sources: "list[torch.Tensor] | None", factors: torch.Tensor, streams: list[int] = (),
                     seed: int = 0, offsets: list[int] = (), rounding: int = 0, *, block: "int | None" = None,
                     chunk: "int | None" = None) -> None:
    block, chunk = default_sizes(block, chunk)
    scalars = RoundingScalars(seed, rounding)
    by_dtype = launch_groups(params, lambda i: params[i].dtype, streams or None, None, chunk, offsets)
    for dtype, idxs, group, tensors, _, chunks in by_dtype:
        companions = [anchors[i] for i in idxs] + ([] if sources is None else [sources[i] for i in idxs])
        extra = extras([(i, anchors[i].data_ptr(), (params if sources is None else sources)[i].data_ptr())
                        for i in idxs], group[0].device)
        dizo_rescale_kernel[(chunks.numel(),)](
            tensors, extra, chunks, factors, chunk, *scalars.kernel_args(), DTYPE=CODES[dtype],
            STOCHASTIC=stochastic(scalars.rounding, dtype),
            BLOCK=block, **alignment(group + companions), **launch_options())
