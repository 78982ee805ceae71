"""Argument checks shared by every op. They run before any tensor is touched, so a rejected call
leaves every tensor as it was."""
from __future__ import annotations

import enum
import math
import struct

import torch

from zokern.random import check_seed, check_stream, parse_distribution

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Rounding(enum.IntEnum):
    """How an op stores its float32 result in 16-bit storage (docs/RANDOM.md, "Stochastic rounding").
    float32 storage keeps the float32 result either way."""
    NEAREST = 0
    STOCHASTIC = 1


def parse_rounding(rounding: "str | int | Rounding") -> Rounding:
    if isinstance(rounding, str):
        try:
            return Rounding[rounding.upper()]
        except KeyError:
            raise ValueError(f"unknown rounding {rounding!r}; expected 'nearest' or 'stochastic'") from None
    if isinstance(rounding, bool) or not isinstance(rounding, int) or rounding not in tuple(Rounding):
        raise ValueError(f"unknown rounding {rounding!r}; expected 'nearest' or 'stochastic'")
    return Rounding(rounding)


# Stream element indices are below 2^62 (docs/RANDOM.md).
MAX_ELEMENT = 1 << 62


def check_offsets(params, offsets) -> list:
    """Element offsets: the stream index of each tensor's element 0, one per tensor, or none (all 0). Each
    tensor's elements must stay within the stream's 2^62 element indices."""
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, (list, tuple)):
        raise TypeError(f"offsets must be a list of ints, got {type(offsets).__name__}")
    if offsets and len(offsets) != len(params):
        raise ValueError(f"got {len(params)} tensors but {len(offsets)} offsets")
    for i, (p, o) in enumerate(zip(params, offsets)):
        if isinstance(o, bool) or not isinstance(o, int):
            raise TypeError(f"offsets[{i}] must be an int, got {type(o).__name__}")
        numel = p.numel() if isinstance(p, torch.Tensor) else 0
        if o < 0 or (isinstance(numel, int) and o + numel > MAX_ELEMENT):
            raise ValueError(f"offsets[{i}] must be in [0, 2**62 - numel], got {o}")
    return list(offsets)


def offsets_or_zeros(offsets, count: int) -> list:
    """A backend's offsets: the given ones, or 0 for every tensor when none are given."""
    return list(offsets) if len(offsets) else [0] * count


def check_tensor_list(params, streams, offsets=()) -> "str | None":
    """Check a list of parameter tensors, their stream ids and element offsets; return the common device
    type."""
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    if len(streams) != len(params):
        raise ValueError(f"got {len(params)} tensors but {len(streams)} stream ids")
    device = None
    for i, (p, k) in enumerate(zip(params, streams)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; zokern ops take float32, bfloat16 or float16 tensors")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {device}; "
                             "one call takes tensors on one device")
        check_stream(k, f"stream_ids[{i}]")
    check_offsets(params, offsets)
    return None if device is None else device.type


def _layout(t: torch.Tensor) -> "tuple[int, int, list[tuple[int, int]]] | None":
    """(first byte, one past the last byte, [(size, byte stride)] of the dims with size > 1) of the memory a
    view can touch in its storage; None when it touches nothing or its layout is symbolic (a traced shape:
    the device implementation checks the real tensor)."""
    size, count, offset = t.element_size(), t.numel(), t.storage_offset()
    if isinstance(count, int) and isinstance(offset, int) and count and t.is_contiguous():
        # One dim of element strides: the same span and stride lattice as the view's own dims, without
        # walking them (an optimizer's call passes hundreds of tensors).
        return offset * size, (offset + count) * size, [(count, size)] if count > 1 else []
    numbers = (*t.shape, *t.stride(), offset)
    if count == 0 or not all(isinstance(v, int) for v in numbers):
        return None
    dims = [(n, s * size) for n, s in zip(t.shape, t.stride()) if n > 1]
    start = offset * size
    return start, start + size + sum((n - 1) * s for n, s in dims), dims


def _has_internal_overlap(dims: list[tuple[int, int]], element_size: int) -> bool:
    """True unless each dim steps past everything the smaller-stride dims span (so every index has its own
    bytes); conservative for exotic as_strided layouts, exact for expands (stride 0) and ordinary views."""
    reach = element_size
    for n, stride in sorted(dims, key=lambda d: d[1]):
        if stride < reach:
            return True
        reach = stride * (n - 1) + reach
    return False


def _may_overlap(a, a_size: int, b, b_size: int) -> bool:
    """Whether two views of one storage can touch a common byte. Disjoint byte ranges cannot; within
    overlapping ranges, both views sit on a lattice of step g (the gcd of their byte strides), so views whose
    elements occupy different residues mod g cannot either (x[::2] and x[1::2])."""
    (a_start, a_end, a_dims), (b_start, b_end, b_dims) = a, b
    if a_end <= b_start or b_end <= a_start:
        return False
    g = math.gcd(*(s for _, s in a_dims + b_dims))
    if g == 0:
        return True
    gap = (b_start - a_start) % g
    return not (gap >= a_size and g - gap >= b_size)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset())


def check_disjoint(written: dict, read: "dict | None" = None, *, in_place_reads: tuple = ()) -> None:
    """Each tensor an op writes must own its memory: no element addressed twice within it (an expanded,
    stride-0 view), and no byte shared with any other tensor of the call, compared as byte ranges of one
    storage, not data pointers (x[0:6] and x[2:8] overlap).

    written/read map a list's name (for the message) to its tensors. A tensor of a read list named in
    in_place_reads may be the very view written at its own index: element-wise ops read each element
    before they write it (sources=params)."""
    views = []  # (name, index, tensor, layout, is written)
    for lists, is_written in ((written, True), (read or {}, False)):
        for name, tensors in lists.items():
            for i, t in enumerate(tensors):
                layout = _layout(t)
                if layout is None:
                    continue
                if is_written and not t.is_contiguous() and _has_internal_overlap(layout[2],
                                                                                  t.element_size()):
                    raise ValueError(f"{name}[{i}] addresses some elements more than once (an expanded or "
                                     f"stride-0 view, strides {tuple(t.stride())}); a tensor written in place "
                                     "must own each of its elements")
                views.append((name, i, t, layout, is_written))
    by_storage: dict = {}
    for view in views:
        by_storage.setdefault(view[2].untyped_storage()._cdata, []).append(view)
    for group in by_storage.values():
        group.sort(key=lambda v: v[3][0])
        for k, (name, i, t, layout, is_written) in enumerate(group):
            for other_name, j, u, other, other_written in group[k + 1:]:
                if other[0] >= layout[1]:
                    break  # sorted by first byte: no later view starts inside this one
                if not (is_written or other_written):
                    continue
                reader = other_name if is_written else name
                if i == j and is_written != other_written and reader in in_place_reads and _same_view(t, u):
                    continue
                if _may_overlap(layout, t.element_size(), other, u.element_size()):
                    raise ValueError(f"{name}[{i}] and {other_name}[{j}] share memory (overlapping bytes of one "
                                     "storage); a tensor the op writes may appear once and overlap no other")


def check_is_tensor_list(params) -> list:
    """The one check the public functions make before calling an op: torch's schema cast would reject a
    non-tensor first, with a message that names nothing. Every other check runs once, inside the op."""
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
    return list(params)


def _float32(value: float) -> float:
    """value rounded to float32, the arithmetic of every kernel (±inf where it overflows)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # struct's way of saying the rounded value is infinite
        return math.copysign(math.inf, value)


def check_finite(name: str, value) -> float:
    """A real number that is finite in float32: a scalar finite in float64 only (1e39) would reach the
    kernels as ±inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(_float32(as_float)):
        raise ValueError(f"{name} must be finite in float32 (the kernels' arithmetic), got {value}")
    return as_float


# The largest |z| of a draw: Box–Muller's radius at the smallest uniform, sqrt(-2 ln 2^-24) ≈ 5.77 (Rademacher
# draws are ±1); 6 bounds it with room for float32 rounding.
Z_BOUND = 6.0
# The step scalars the kernels multiply by a draw z (docs/OPS.md).
_TIMES_Z = ("scale", "restore", "grad", "next_scale")


def check_step_args(*, seed: int, dist: int, count: int = 0, next_seed: int = -1, weight_decays=(), **scalars) -> None:
    """Check an op's seeds, distribution and scalars, and the products of scalars the kernels form
    (scalar·z and lr·(grad·z)), in float32, so a step cannot write ±inf from its scalars alone. The optimizers
    call this too, before their first write."""
    check_seed(seed)
    parse_distribution(dist)
    values = {name: check_finite(name, value) for name, value in scalars.items()}
    products = [((name,), (values[name], Z_BOUND)) for name in _TIMES_Z if name in values]
    if "lr" in values and "grad" in values:
        products.append((("lr", "grad"), (values["grad"], Z_BOUND, values["lr"])))
    for names, factors in products:
        product = 1.0
        for factor in factors:  # rounded to float32 after each multiplication, as the kernels do
            product = _float32(product * _float32(factor))
        if not math.isfinite(product):
            raise ValueError(f"{' * '.join(names)} * z overflows float32 for |z| up to {Z_BOUND:g} "
                             f"({', '.join(f'{name}={values[name]:g}' for name in names)})")
    if next_seed != -1:
        check_seed(next_seed, "next_seed")
    if count and len(weight_decays) != count:
        raise ValueError(f"got {len(weight_decays)} weight decays for {count} tensors")
    for i, wd in enumerate(weight_decays):
        check_finite(f"weight_decay[{i}]", wd)


def check_fill_args(out, seed: int, stream: int, offset: int, domain: int, dist: int) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise TypeError(f"out must be a float32 tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    check_seed(seed)
    check_stream(stream)
    check_stream(domain, "domain")
    parse_distribution(dist)
    if offset < 0 or offset + out.numel() > MAX_ELEMENT:
        raise ValueError(f"offset must be in [0, 2**62 - numel], got {offset}")


def check_companions(params, others, what: str, *, dtypes=None, shapes=None) -> None:
    """Check tensors that go with params one to one (anchors, Hessians, masks, factors): a list of the same
    length, on the same device, with the given dtypes and shapes (default: each param's own shape)."""
    if isinstance(others, torch.Tensor) or not isinstance(others, (list, tuple)):
        raise TypeError(f"{what} must be a list of tensors, got {type(others).__name__}")
    if len(others) != len(params):
        raise ValueError(f"got {len(params)} tensors but {len(others)} {what}")
    for i, (p, o) in enumerate(zip(params, others)):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(o).__name__}, expected a torch.Tensor")
        if o.device != p.device:
            raise ValueError(f"{what}[{i}] is on {o.device} but params[{i}] is on {p.device}")
        allowed = dtypes(p) if callable(dtypes) else (dtypes or FLOAT_DTYPES)
        if o.dtype not in allowed:
            raise TypeError(f"{what}[{i}] has dtype {o.dtype}; expected one of {', '.join(map(str, allowed))}")
        shape = tuple(p.shape) if shapes is None else tuple(shapes(p, o))
        if tuple(o.shape) != shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(o.shape)}; expected {shape}")


def check_per_tensor(params, values: torch.Tensor, what: str) -> None:
    """A float32 vector with one entry per tensor, on the tensors' device."""
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float32 or values.dim() != 1:
        raise TypeError(f"{what} must be a 1-D float32 tensor with one entry per tensor")
    if values.numel() != len(params):
        raise ValueError(f"{what} has {values.numel()} entries for {len(params)} tensors")
    if params and values.device != params[0].device:
        raise ValueError(f"{what} is on {values.device} but the tensors are on {params[0].device}")


def mask_words(numel: int) -> int:
    return (numel + 31) // 32


def check_lowrank(weights, us, vs, cores) -> None:
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}; low-rank ops take 2-D views "
                             "(see zokern.ops.lowrank_shape)")
    check_companions(weights, us, "us", shapes=lambda w, u: (w.shape[0], u.shape[-1] if u.dim() == 2 else -1))
    check_companions(weights, vs, "vs", shapes=lambda w, v: (w.shape[1], v.shape[-1] if v.dim() == 2 else -1))
    for i, (u, v) in enumerate(zip(us, vs)):
        if u.shape[1] != v.shape[1]:
            raise ValueError(f"us[{i}] has rank {u.shape[1]} but vs[{i}] has rank {v.shape[1]}")
    check_companions(weights, cores, "cores", dtypes=(torch.float32,),
                     shapes=lambda w, c: (c.shape[0], c.shape[0]) if c.dim() == 2 else (-1, -1))
    for i, (u, c) in enumerate(zip(us, cores)):
        if c.shape[0] != u.shape[1]:
            raise ValueError(f"cores[{i}] is {tuple(c.shape)} but the rank of us[{i}] is {u.shape[1]}")
