"""The zokern random stream (docs/RANDOM.md) as Triton device functions.

Everything here is exact integer arithmetic except the Box–Muller transcendentals, which agree with the
reference (`zokern.random`) to a few float32 ulps.
"""
import triton
import triton.language as tl
from triton import knobs

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
# float32(2π) · 2^-24, exactly representable in float32.
TWO_PI_2M24 = tl.constexpr(6.2831854820251465 / 16777216.0)
TWO_M24 = tl.constexpr(1.0 / 16777216.0)

# Whether triton.jit interprets (TRITON_INTERPRET), read the way triton.jit reads it when it decorates.
INTERPRET = bool(knobs.runtime.interpret)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 values (tensors broadcast together); returns the four output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def philox_calls(j, stream, domain, k0, k1):
    """The four words of Philox calls j (int64 tensor): counter (j lo, j hi, stream, domain), key (k0, k1)."""
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + stream
    c3 = tl.zeros_like(c0) + domain
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


# docs/RANDOM.md asks for accurate float32 log/cos/sin, not fast-math approximations. Compiled, tl.log/tl.cos/
# tl.sin may lower to approximate instructions (lg2.approx, cos.approx, sin.approx on NVIDIA), so compiled
# kernels call libdevice (__nv_logf ≤ 1 ulp, __nv_cosf/__nv_sinf ≤ 2 ulp). The interpreter has no libdevice;
# there tl.log/tl.cos/tl.sin are numpy's. tl.sqrt_rn is IEEE-rounded on every target. The choice is made
# once, at import, as triton.jit decides between compiling and interpreting when it decorates.
if INTERPRET:
    @triton.jit
    def _log_cos_sin(u, t):
        # numpy's float32 log is off by up to 3.5 ulp; through float64 all three are within ~0.5 ulp.
        u64 = u.to(tl.float64)
        t64 = t.to(tl.float64)
        return tl.log(u64).to(tl.float32), tl.cos(t64).to(tl.float32), tl.sin(t64).to(tl.float32)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _log_cos_sin(u, t):
        return libdevice.log(u), libdevice.cos(t), libdevice.sin(t)


@triton.jit
def box_muller(a, b):
    """Two standard normals from a pair of words (docs/RANDOM.md, Gaussian)."""
    u = ((a >> 8) + 1).to(tl.float32) * TWO_M24
    t = (b >> 8).to(tl.float32) * TWO_PI_2M24
    log_u, cos_t, sin_t = _log_cos_sin(u, t)
    r = tl.sqrt_rn(-2.0 * log_u)
    return r * cos_t, r * sin_t


@triton.jit
def rademacher(w):
    return tl.where((w >> 31) == 0, 1.0, -1.0)


@triton.jit
def rademacher_bits(j, stream, domain, k0, k1):
    """The one-bit Rademacher values of elements 4·j[r] + q as an [R, 4] block: bit 4·(j & 7) + q of word
    (j >> 3) & 3 of Philox call j >> 5 (element i: bit i & 31 of word (i >> 5) & 3 of call i >> 7)."""
    w0, w1, w2, w3 = philox_calls(j >> 5, stream, domain, k0, k1)
    sel = (j >> 3) & 3
    word = tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))
    bit = ((j & 7) * 4).to(tl.uint32)[:, None] + tl.arange(0, 4).to(tl.uint32)[None, :]
    return tl.where(((word[:, None] >> bit) & 1) == 0, 1.0, -1.0)


@triton.jit
def draw_rows(j, stream, domain, k0, k1, DIST: tl.constexpr):
    """Stream values for elements 4·j[r] + q (j: [R] int64) as an [R, 4] float32 block: row r, column q.
    For DIST 0 and 1, row r is Philox call j[r]: its four values are computed once per row and picked by
    column, so each thread owns four contiguous elements."""
    if DIST == 2:
        z = rademacher_bits(j, stream, domain, k0, k1)
    else:
        w0, w1, w2, w3 = philox_calls(j, stream, domain, k0, k1)
        if DIST == 0:
            v0, v1 = box_muller(w0, w1)
            v2, v3 = box_muller(w2, w3)
        else:
            v0 = rademacher(w0)
            v1 = rademacher(w1)
            v2 = rademacher(w2)
            v3 = rademacher(w3)
        q = tl.arange(0, 4)[None, :]
        z = tl.where(q == 0, v0[:, None],
                     tl.where(q == 1, v1[:, None], tl.where(q == 2, v2[:, None], v3[:, None])))
    return z


@triton.jit(do_not_specialize=["n", "first_call", "stream", "domain", "k0", "k1"])
def philox_words_kernel(out, n, first_call, stream, domain, k0, k1, BLOCK: tl.constexpr):
    """out[r, q] = word q of Philox call first_call + r, as int64; scalars arrive as int32 bit patterns."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < n
    w0, w1, w2, w3 = philox_calls(first_call.to(tl.int64) + r, stream.to(tl.uint32, bitcast=True),
                                  domain.to(tl.uint32, bitcast=True), k0.to(tl.uint32, bitcast=True),
                                  k1.to(tl.uint32, bitcast=True))
    tl.store(out + 4 * r, w0.to(tl.int64), mask=mask)
    tl.store(out + 4 * r + 1, w1.to(tl.int64), mask=mask)
    tl.store(out + 4 * r + 2, w2.to(tl.int64), mask=mask)
    tl.store(out + 4 * r + 3, w3.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["numel", "offset", "stream", "domain", "k0", "k1"])
def fill_random_kernel(out, numel, offset, stream, domain, k0, k1, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """out[idx] = stream element offset + idx. The grid runs over the Philox calls covering the range, so
    an offset that is not a multiple of 4 only masks the edges."""
    R: tl.constexpr = BLOCK // 4
    offset = offset.to(tl.int64)
    # `// 4`, not `>> 2`: the interpreter holds an int argument in [2^31, 2^32) as uint32 data under an
    # int64 type, and its shift would reinterpret it as negative.
    j = offset // 4 + tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    idx = (j * 4)[:, None] + tl.arange(0, 4)[None, :] - offset
    mask = (idx >= 0) & (idx < numel)
    z = draw_rows(j, stream.to(tl.uint32, bitcast=True), domain.to(tl.uint32, bitcast=True),
                  k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), DIST)
    tl.store(out + idx, z, mask=mask)
