"""Multi-tensor perturb / fused-step kernels (docs/OPS.md).

One launch covers every tensor of one dtype. `tensors` is an int64 table with one row per tensor,
(data_ptr, numel, stream id, index of its first chunk); `chunks` maps each program to its tensor (int32),
and a program handles elements [(pid − first chunk) · chunk, … + chunk) of that tensor, BLOCK at a time.
Element indices are int64 throughout, so tensors may exceed 2^31 elements.
"""
import triton
import triton.language as tl

from .philox import draw_rows

FLOAT32 = tl.constexpr(0)
BFLOAT16 = tl.constexpr(1)
FLOAT16 = tl.constexpr(2)
PERTURBATION = tl.constexpr(0)


@triton.jit
def _pointer(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor at integer address addr as a pointer; ALIGNED promises addr is aligned to 4 elements."""
    # bf16 is moved as raw uint16 bits: conversions are done by hand (below), which is exact on every
    # target and sidesteps the interpreter's truncating fp32→bf16 cast.
    if DTYPE == BFLOAT16:
        ptr = addr.to(tl.pointer_type(tl.uint16))
    elif DTYPE == FLOAT16:
        ptr = addr.to(tl.pointer_type(tl.float16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # A pointer made from an integer carries no alignment. Knowing that 4 elements are aligned lets the
        # compiler give each thread whole rows (4 contiguous elements, one Philox call) and vectorize.
        ptr = tl.multiple_of(ptr, 16 if DTYPE == FLOAT32 else 8)
    return ptr


@triton.jit
def _load_f32(ptr, mask, DTYPE: tl.constexpr):
    if DTYPE == BFLOAT16:
        bits = tl.load(ptr, mask=mask)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask).to(tl.float32)


@triton.jit
def _bf16_bits_rne(x):
    """fp32 → bf16 bit pattern, round to nearest even; ±inf and overflow → ±inf; every NaN → the canonical 0x7FFF
    (docs/OPS.md: the same bits on every backend)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FFF, rounded).to(tl.uint16)


@triton.jit
def _f16_rne(x):
    """fp32 → fp16, round to nearest even; every NaN → the canonical 0x7FFF (the GPU's conversion gives it, the
    interpreter's keeps the payload)."""
    bits = x.to(tl.float16).to(tl.uint16, bitcast=True)
    return tl.where(x != x, 0x7FFF, bits).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _store_f32(ptr, x, mask, DTYPE: tl.constexpr):
    if DTYPE == BFLOAT16:
        tl.store(ptr, _bf16_bits_rne(x), mask=mask)
    elif DTYPE == FLOAT16:
        tl.store(ptr, _f16_rne(x), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS: tl.constexpr):
    """This program's chunk of the multi-tensor launch: (tensor index t, address, stream, start, end), from
    the chunk table (tensor index per program) and tensor table rows (address, numel, stream, first chunk)."""
    pid = tl.program_id(0)
    t = tl.load(chunks + pid).to(tl.int64)
    start = (pid - tl.load(tensors + 4 * t + 3)) * chunk
    end = tl.minimum(tl.load(tensors + 4 * t + 1), start + chunk)
    if ALIGNED_ENDS:
        # With end a multiple of 4 the mask is constant over each row's 4 elements, so masked accesses can
        # still be vector accesses.
        end = tl.multiple_of(end, 4)
    return t, tl.load(tensors + 4 * t), tl.load(tensors + 4 * t + 2).to(tl.uint32), start, end


@triton.jit
def seed_keys(k0, k1, nk0, nk1):
    """The Philox keys of this step's seed and the next step's, from the int32 bit patterns of their halves."""
    return (k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), nk0.to(tl.uint32, bitcast=True),
            nk1.to(tl.uint32, bitcast=True))


@triton.jit(do_not_specialize=["k0", "k1", "nk0", "nk1"])
def zo_update_kernel(tensors, chunks, weight_decays, chunk, k0, k1, restore, lr, grad, nk0, nk1, next_scale,
                     DTYPE: tl.constexpr, DIST: tl.constexpr, FUSED: tl.constexpr, HAS_NEXT: tl.constexpr,
                     ALIGNED_PTRS: tl.constexpr, ALIGNED_ENDS: tl.constexpr, BLOCK: tl.constexpr):
    """perturb (FUSED=False): x + restore·z with restore = scale. fused_step (FUSED=True): restore, the MeZO
    update with per-tensor weight decay and, if HAS_NEXT, the next perturbation. Seeds arrive as int32
    bit patterns of their 32-bit halves (k0, k1) and (nk0, nk1). ALIGNED_PTRS promises that every tensor's
    address is aligned to 4 elements, ALIGNED_ENDS that every numel is a multiple of 4."""
    t, addr, stream, start, end = chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS)
    ptr0 = _pointer(addr, DTYPE, ALIGNED_PTRS)
    key0, key1, next_key0, next_key1 = seed_keys(k0, k1, nk0, nk1)
    if FUSED:
        wd = tl.load(weight_decays + t)
    rows = tl.arange(0, BLOCK // 4)
    cols = tl.arange(0, 4)
    # start and BLOCK are multiples of 4, so row r of a block is exactly Philox call base / 4 + r. The loop
    # runs over offsets within the chunk: the interpreter's loop variable is a Python int, and base must
    # stay int64.
    for off in range(0, end - start, BLOCK):
        base = start + off
        j = (base >> 2) + rows
        i = (j * 4)[:, None] + cols[None, :]
        mask = i < end
        ptr = ptr0 + i
        x = _load_f32(ptr, mask, DTYPE)
        z = draw_rows(j, stream, PERTURBATION, key0, key1, DIST)
        x = x + restore * z
        if FUSED:
            x = x - lr * (grad * z + wd * x)
            if HAS_NEXT:
                x = x + next_scale * draw_rows(j, stream, PERTURBATION, next_key0, next_key1, DIST)
        _store_f32(ptr, x, mask, DTYPE)
