"""Multi-tensor perturb / fused-step kernels (docs/OPS.md).

One launch covers every tensor of one dtype. `tensors` is an int64 table with one row per tensor,
(data_ptr, numel, stream id, index of its first chunk, element offset); `chunks` maps each program to its tensor
(int32), and a program handles elements [(pid − first chunk) · chunk, … + chunk) of that tensor, BLOCK at a time.
Element l of a tensor is stream element offset + l. Element indices are int64 throughout, so tensors may exceed
2^31 elements.

Blocks are rows of whole Philox calls: row r, column q is stream element 4·j[r] + q. For a tensor whose offset
is not a multiple of 4 (phase = offset mod 4), the kernels address it through a pointer moved back by `phase`
elements, so that its index v = l + phase is again 4·(call − offset // 4) + q, and mask v outside
[start + phase, end + phase): no extra draws, only the edge rows are partial.
"""
import triton
import triton.language as tl

from .philox import draw_rows, philox_calls

FLOAT32 = tl.constexpr(0)
BFLOAT16 = tl.constexpr(1)
FLOAT16 = tl.constexpr(2)
PERTURBATION = tl.constexpr(0)
ROUNDING = tl.constexpr(4)
# Columns of a tensor table row (multi_tensor.tables): address, numel, stream, first chunk, element offset.
ROW = tl.constexpr(5)


@triton.jit
def _pointer(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor at integer address addr as a pointer; ALIGNED promises addr is aligned to 4 elements."""
    return _phase_pointer(addr, 0, DTYPE, ALIGNED)


@triton.jit
def _phase_pointer(addr, phase, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor at integer address addr as a pointer moved back by `phase` elements (the module docstring);
    ALIGNED promises that the moved pointer is aligned to 4 elements."""
    # bf16 is moved as raw uint16 bits: conversions are done by hand (below), which is exact on every
    # target and sidesteps the interpreter's truncating fp32→bf16 cast.
    # The move is made on the integer address: the alignment hint below must sit on the pointer itself.
    if DTYPE == BFLOAT16:
        ptr = (addr - 2 * phase).to(tl.pointer_type(tl.uint16))
    elif DTYPE == FLOAT16:
        ptr = (addr - 2 * phase).to(tl.pointer_type(tl.float16))
    else:
        ptr = (addr - 4 * phase).to(tl.pointer_type(tl.float32))
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
def stochastic_bits(x, r, DTYPE: tl.constexpr):
    """The 16-bit pattern (in uint32) of float32 x rounded stochastically to DTYPE with the rounding words r
    (docs/RANDOM.md, "Stochastic rounding"; element.h's float_to_*_bits_stochastic): integer arithmetic only."""
    u = x.to(tl.uint32, bitcast=True)
    if DTYPE == BFLOAT16:
        out = (u + (r & 0xFFFF)) >> 16
    else:
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        e = a >> 23
        normal = (a - (112 << 23) + (r & 0x1FFF)) >> 13
        # float16 subnormals: the value in units of 2^-24 is m / 2^s; lanes with e > 126 are not selected.
        s = tl.where(e == 0, 125, 126 - tl.minimum(e, 126))
        t = tl.minimum(s, 16).to(tl.uint64)
        m = tl.where(e == 0, a & 0x7FFFFF, (a & 0x7FFFFF) | 0x800000) >> tl.minimum(s - t.to(tl.uint32), 31)
        one = tl.full(t.shape, 1, tl.uint64)
        subnormal = ((m.to(tl.uint64) + (r.to(tl.uint64) & ((one << t) - 1))) >> t).to(tl.uint32)
        out = sign | tl.where(a >= 0x47800000, 0x7C00, tl.where(e >= 113, normal, subnormal))
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FFF, out)


@triton.jit
def store_rounded(ptr, x, mask, r, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """x stored to DTYPE: stochastically with the rounding words r if STOCHASTIC (16-bit DTYPE only), else to
    nearest even."""
    if STOCHASTIC:
        bits = stochastic_bits(x, r, DTYPE).to(tl.uint16)
        if DTYPE == BFLOAT16:
            tl.store(ptr, bits, mask=mask)
        else:
            tl.store(ptr, bits.to(tl.float16, bitcast=True), mask=mask)
    else:
        _store_f32(ptr, x, mask, DTYPE)


@triton.jit
def _pick(w0, w1, w2, w3, q):
    return tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))


@triton.jit
def rounding_rows(j, stream, k0, k1):
    """The rounding words of elements 4·j[r] + q as an [R, 4] uint32 block (row r, column q). Element e's is
    half e & 1 (the low one first) of word (e >> 1) & 3 of Philox call e >> 3 (docs/RANDOM.md): a row is half a
    call, evaluated once per row."""
    w0, w1, w2, w3 = philox_calls(j >> 1, stream, ROUNDING, k0, k1)
    q = tl.arange(0, 4)[None, :]
    word = _pick(w0[:, None], w1[:, None], w2[:, None], w3[:, None], 2 * (j[:, None] & 1) + (q >> 1))
    return (word >> ((q & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def rounding_words(i, stream, k0, k1):
    """The rounding words of stream elements i (int64, any shape), as rounding_rows: one Philox call per element."""
    w0, w1, w2, w3 = philox_calls(i >> 3, stream, ROUNDING, k0, k1)
    return (_pick(w0, w1, w2, w3, (i >> 1) & 3) >> ((i & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS: tl.constexpr):
    """This program's chunk of the multi-tensor launch: (tensor index t, address, stream, start, end, element
    offset), from the chunk table (tensor index per program) and the tensor table's rows."""
    pid = tl.program_id(0)
    t = tl.load(chunks + pid).to(tl.int64)
    row = tensors + ROW * t
    start = (pid - tl.load(row + 3)) * chunk
    end = tl.minimum(tl.load(row + 1), start + chunk)
    if ALIGNED_ENDS:
        # With end a multiple of 4 the mask is constant over each row's 4 elements, so masked accesses can
        # still be vector accesses.
        end = tl.multiple_of(end, 4)
    return t, tl.load(row), tl.load(row + 2).to(tl.uint32), start, end, tl.load(row + 4)


@triton.jit
def phase_of(offset, ALIGNED_ENDS: tl.constexpr):
    """offset mod 4; ALIGNED_ENDS promises every offset is a multiple of 4."""
    if ALIGNED_ENDS:
        return 0
    else:
        return offset & 3


@triton.jit
def call_rows(start, off, offset, phase, end, ROWS: tl.constexpr, ALIGNED_ENDS: tl.constexpr):
    """The rows of the block at off within a chunk [start, end) (the module docstring): (Philox calls j [ROWS],
    phase-moved indices v [ROWS, 4], mask [ROWS, 4] of the tensor's elements)."""
    calls = ((start + off) >> 2) + tl.arange(0, ROWS)
    v = (calls * 4)[:, None] + tl.arange(0, 4)[None, :]
    if ALIGNED_ENDS:
        inside = v < end
    else:
        inside = (v >= start + phase) & (v < end + phase)
    return (offset >> 2) + calls, v, inside


@triton.jit
def shifted(rows, next_rows, phase):
    """Row r, column q: column q + phase of `rows`, continued into `next_rows` (the next calls' block), picked
    exactly (a gather, no arithmetic)."""
    q = tl.broadcast_to(tl.arange(0, 4)[None, :] + phase.to(tl.int32), rows.shape)
    return tl.where(q < 4, tl.gather(rows, q & 3, 1), tl.gather(next_rows, q & 3, 1))


@triton.jit
def draw_shifted(j, phase, stream, domain, k0, k1, DIST: tl.constexpr, SHIFTED: tl.constexpr):
    """Row r, column q: stream element 4·j[r] + phase + q. SHIFTED=False promises phase == 0 (one draw);
    otherwise the elements come from calls j and j + 1."""
    z = draw_rows(j, stream, domain, k0, k1, DIST)
    if SHIFTED:
        z = shifted(z, draw_rows(j + 1, stream, domain, k0, k1, DIST), phase)
    return z


@triton.jit
def seed_keys(k0, k1, nk0, nk1):
    """The Philox keys of this step's seed and the next step's, from the int32 bit patterns of their halves."""
    return (k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), nk0.to(tl.uint32, bitcast=True),
            nk1.to(tl.uint32, bitcast=True))


@triton.jit
def step_prologue(tensors, chunks, weight_decays, chunk, k0, k1, nk0, nk1, DTYPE: tl.constexpr, FUSED: tl.constexpr,
                  ALIGNED_PTRS: tl.constexpr, ALIGNED_ENDS: tl.constexpr):
    """What an element-wise step kernel (MeZO's, HiZOO's) takes from its launch before its loop: (tensor index t,
    stream, start, end, element offset, phase, the tensor's phase-moved pointer, the Philox keys of this step's
    seed and the next's, the tensor's weight decay (0 unless FUSED))."""
    t, addr, stream, start, end, offset = chunk_of_program(tensors, chunks, chunk, ALIGNED_ENDS)
    phase = phase_of(offset, ALIGNED_ENDS)
    ptr0 = _phase_pointer(addr, phase, DTYPE, ALIGNED_PTRS)
    key0, key1, next_key0, next_key1 = seed_keys(k0, k1, nk0, nk1)
    if FUSED:
        wd = tl.load(weight_decays + t)
    else:
        wd = 0.0
    return t, stream, start, end, offset, phase, ptr0, key0, key1, next_key0, next_key1, wd


@triton.jit(do_not_specialize=["k0", "k1", "nk0", "nk1"])
def mezo_kernel(tensors, chunks, weight_decays, chunk, k0, k1, restore, lr, grad, nk0, nk1, next_scale,
                     DTYPE: tl.constexpr, DIST: tl.constexpr, FUSED: tl.constexpr, HAS_NEXT: tl.constexpr,
                     STOCHASTIC: tl.constexpr, ALIGNED_PTRS: tl.constexpr, ALIGNED_ENDS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """perturb (FUSED=False): x + restore·z with restore = scale. fused_step (FUSED=True): restore, the MeZO
    update with per-tensor weight decay and, if HAS_NEXT, the next perturbation; stored with stochastic
    rounding if STOCHASTIC (16-bit DTYPE). Seeds arrive as int32 bit patterns of their 32-bit halves (k0, k1)
    and (nk0, nk1). ALIGNED_PTRS promises that every tensor's phase-moved address is aligned to 4 elements,
    ALIGNED_ENDS that every numel and offset is a multiple of 4."""
    t, stream, start, end, offset, phase, ptr0, key0, key1, next_key0, next_key1, wd = step_prologue(
        tensors, chunks, weight_decays, chunk, k0, k1, nk0, nk1, DTYPE, FUSED, ALIGNED_PTRS, ALIGNED_ENDS)
    # start and BLOCK are multiples of 4, so row r of a block is exactly one Philox call. The loop runs over
    # offsets within the chunk: the interpreter's loop variable is a Python int, and indices must stay int64.
    for off in range(0, end - start + phase, BLOCK):
        j, v, mask = call_rows(start, off, offset, phase, end, BLOCK // 4, ALIGNED_ENDS)
        ptr = ptr0 + v
        x = _load_f32(ptr, mask, DTYPE)
        z = draw_rows(j, stream, PERTURBATION, key0, key1, DIST)
        x = x + restore * z
        if FUSED:
            x = x - lr * (grad * z + wd * x)
            if HAS_NEXT:
                x = x + next_scale * draw_rows(j, stream, PERTURBATION, next_key0, next_key1, DIST)
        if STOCHASTIC:
            r = rounding_rows(j, stream, key0, key1)
        else:
            r = 0
        store_rounded(ptr, x, mask, r, DTYPE, STOCHASTIC)
