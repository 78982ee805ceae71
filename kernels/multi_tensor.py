"""Launcher plumbing shared by every Triton launcher (zokern/backends/triton.py for the MeZO ops; sparse.py,
hizoo.py, dizo.py, subzero.py for the methods).

The multi-tensor scheme (apex multi_tensor_apply): per dtype group (launch_groups), a tensor table and a chunk
table from tables() (data_ptr, numel, stream, first chunk, element offset: the stream index of element 0).
Companion tensors (masks, Hessians, anchors, sources) and the tensor's index in the caller's list (for
per-tensor device vectors such as thresholds and factors) go in a second int64 table, `extras`, one row per
tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from .philox import INTERPRET
from .mezo import BFLOAT16, FLOAT16, FLOAT32, _bf16_bits_rne, stochastic_bits

CODES = {torch.float32: FLOAT32.value, torch.bfloat16: BFLOAT16.value, torch.float16: FLOAT16.value}
MASK32 = 0xFFFFFFFF
_CACHE_SIZE = 16
# Launch tables per (device, chunk, tensors, offsets, weight decays); parameters keep their storage across steps,
# so a training loop reuses them instead of copying them to the device every call.
_tables_cache: dict = {}


def stochastic(rounding: int, dtype: torch.dtype) -> bool:
    """Whether a launch for tensors of dtype rounds stochastically (STOCHASTIC): rounding 1 (validation.Rounding)
    on 16-bit storage; float32 keeps its float32 result either way."""
    return int(rounding) == 1 and dtype != torch.float32


def i32(v: int) -> int:
    """A 32-bit value as the int32 with the same bits: every launch then sees int32, whatever the value."""
    return v - (1 << 32) if v >= (1 << 31) else v


def seed_words(seed: int) -> tuple[int, int]:
    return i32(seed & MASK32), i32(seed >> 32)


@dataclasses.dataclass(frozen=True)
class StepScalars:
    """The scalars of a MeZO or Sparse MeZO launch, built once by the op's launcher; kernel_args() is what the
    kernels take after the chunk size. A perturbation is a step with restore = scale and nothing else."""
    seed: int
    restore: float
    lr: float = 0.0
    grad: float = 0.0
    next_seed: int = -1  # none
    next_scale: float = 0.0
    rounding: int = 0

    @property
    def has_next(self) -> bool:
        return self.next_seed >= 0

    def kernel_args(self) -> tuple:
        """(k0, k1, restore, lr, grad, nk0, nk1, next_scale): seeds as the int32 words of their halves."""
        return (*seed_words(self.seed), float(self.restore), float(self.lr), float(self.grad),
                *(seed_words(self.next_seed) if self.has_next else (0, 0)), float(self.next_scale))


@dataclasses.dataclass(frozen=True)
class RoundingScalars:
    """The scalars of the ops that draw only their rounding words (SubZero, DiZO): the seed that keys them and
    the rounding mode (validation.Rounding)."""
    seed: int = 0
    rounding: int = 0

    def kernel_args(self) -> tuple:
        """(k0, k1): the seed as the int32 words of its halves."""
        return seed_words(self.seed)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_options() -> dict:
    # Without fusion the compiled code rounds every product and sum as docs/OPS.md writes them (no FMA).
    return {} if INTERPRET else {"num_warps": 4, "enable_fp_fusion": False}


def default_sizes(block: "int | None", chunk: "int | None") -> tuple[int, int]:
    # Each interpreted program costs milliseconds of Python, so the interpreter takes big blocks. Compiled,
    # 1024 elements over 4 warps gives each thread 2 Philox calls (8 elements); on sm_90 the fused step with a
    # next perturbation then needs 68 registers and no spills (2048: 117).
    if block is None:
        block = 16384 if INTERPRET else 1024
    if chunk is None:
        chunk = max(65536, block)
    if block < 4 or block & (block - 1) or block > 1 << 20:
        raise ValueError(f"block must be a power of two in [4, 2**20], got {block}")
    if chunk < 4 or chunk % 4:
        raise ValueError(f"chunk must be a positive multiple of 4, got {chunk}")
    return block, chunk


def tables(group: list[torch.Tensor], streams: list[int], wds: "list[float] | None", chunk: int,
            device: torch.device, offsets: "list[int] | None" = None):
    """(tensor table int64 [T, mezo.ROW], weight decays float32 [T] or None, chunk table int32 [C]) on device;
    offsets None: 0 for every tensor."""
    offsets = [0] * len(group) if offsets is None else offsets
    key = (device, chunk, tuple((p.data_ptr(), p.numel()) for p in group), tuple(streams), tuple(offsets),
           None if wds is None else tuple(wds))
    hit = _tables_cache.get(key)
    if hit is not None:
        return hit
    rows, counts, first = [], [], 0
    for p, stream, offset in zip(group, streams, offsets):
        count = cdiv(p.numel(), chunk)
        rows.append((p.data_ptr(), p.numel(), stream, first, offset))
        counts.append(count)
        first += count
    tensors = torch.tensor(rows, dtype=torch.int64, device=device)
    chunks = torch.repeat_interleave(torch.arange(len(group), dtype=torch.int32),
                                     torch.tensor(counts, dtype=torch.int64)).to(device)
    weight_decays = None if wds is None else torch.tensor(wds, dtype=torch.float32, device=device)
    if len(_tables_cache) >= _CACHE_SIZE:
        _tables_cache.pop(next(iter(_tables_cache)))
    _tables_cache[key] = (tensors, weight_decays, chunks)
    return tensors, weight_decays, chunks



_extras_cache: dict = {}


def groups(params, key) -> dict:
    """Indices of the non-empty tensors, grouped by key(index) (one launch per group), in first-seen order."""
    out: dict = {}
    for idx, p in enumerate(params):
        if p.numel() > 0:
            out.setdefault(key(idx), []).append(idx)
    return out


def launch_groups(params, key, streams: "list[int] | None", weight_decays: "list[float] | None", chunk: int,
                  offsets: "list[int] | None" = None):
    """The launches of a multi-tensor op: per group of non-empty tensors sharing key(index), in first-seen order,
    (key, indices, tensors, tensor table, weight decays or None, chunk table), inside the tensors' device
    context. streams None: the op draws nothing (stream ids 0); offsets None or empty: element offsets 0."""
    by_key = groups(params, key)
    if not by_key:
        return
    device = params[next(iter(by_key.values()))[0]].device
    with device_ctx(device):
        for group_key, idxs in by_key.items():
            group = [params[i] for i in idxs]
            tensors, wds, chunks = tables(group, [0] * len(idxs) if streams is None else [streams[i] for i in idxs],
                                          None if weight_decays is None else [float(weight_decays[i]) for i in idxs],
                                          chunk, device, [offsets[i] for i in idxs] if offsets else None)
            yield group_key, idxs, group, tensors, wds, chunks


def extras(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """int64 [T, K] table of `rows` on device, cached like tables(): tensors keep their storage across
    steps, so a training loop does not copy the table every call."""
    key = (device, tuple(rows))
    hit = _extras_cache.get(key)
    if hit is None:
        hit = torch.tensor(rows, dtype=torch.int64, device=device)
        if len(_extras_cache) >= _CACHE_SIZE:
            _extras_cache.pop(next(iter(_extras_cache)))
        _extras_cache[key] = hit
    return hit


def alignment(tensors, offsets: "list[int] | None" = None) -> dict:
    """mezo.py's alignment promises, for tensors whose element 0 is stream element offsets[k] (None: all 0):
    every address, moved back by offset mod 4 elements (to where the Philox call of element 0 starts), aligned
    to 4 elements of its own dtype (what _pointer's ALIGNED means); every offset and numel a multiple of 4
    (chunks start and end on whole Philox calls)."""
    phases = [0] * len(tensors) if offsets is None else [o % 4 for o in offsets]
    return {"ALIGNED_PTRS": all((t.data_ptr() - phase * t.element_size()) % (4 * t.element_size()) == 0
                                for t, phase in zip(tensors, phases)),
            "ALIGNED_ENDS": all(t.numel() % 4 == 0 for t in tensors) and not any(phases)}


def kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors are passed as their uint16 bits (mezo.py's _load_f32/_store_f32 convert by hand)."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


@triton.jit
def round_to(x, r, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """float32(round(x)) in DTYPE, the value a store of x would leave in memory: round to nearest even, or
    stochastically with the rounding words r if STOCHASTIC."""
    if STOCHASTIC:
        bits = stochastic_bits(x, r, DTYPE)
        if DTYPE == BFLOAT16:
            return (bits << 16).to(tl.float32, bitcast=True)
        else:
            return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    elif DTYPE == BFLOAT16:
        return (_bf16_bits_rne(x).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == FLOAT16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x
