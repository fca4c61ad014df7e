"""The exact contract's arithmetic as Triton device functions, shared by every exact kernel (CUDA and Triton-Ascend).

Each function performs the same sequence of IEEE fp32 operations as its torch twin in
`dsv4.backends.canonical.primitives`, so a kernel built from them gives the CPU reference's bits. Kernels that use
them are compiled with `enable_fp_fusion=False` (no FMA contraction); division and square root are the correctly
rounded `div_rn` / `sqrt_rn`, never Triton's default approximate ones. Rounding to an integer uses the 1.5 * 2^23
trick and fp32 -> bf16 rounding works on the integer bits, so Triton's CPU interpreter gives the same bits as a GPU
(the interpreter truncates on a plain bf16 cast).

Lane sums (contracts.REDUCTION_LANES = 16): a kernel keeps 16 lane accumulators as the last dim of a tile, starts
them at +0.0 and adds chunks of 16 elements in increasing order; `lane_tree` then halves the lanes pairwise.
Streaming kernels load each 16-element chunk straight into a [..., 16] tile (`tl.arange(0, 16)` as the last
offset), so a chunk is added with one elementwise op; `split4` (a register shuffle) serves kernels that hold 64
columns at once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dsv4.backends.canonical import primitives as P
from dsv4.backends.contracts import FP4_MAX as _FP4_MAX, FP8_MAX as _FP8_MAX, REDUCTION_LANES
from dsv4.formats import FP4_AMAX_FLOOR as _FP4_AMAX_FLOOR, FP8_AMAX_FLOOR as _FP8_AMAX_FLOOR

assert REDUCTION_LANES == 16, "lane_tree below is written for 16 lanes"

LOG2E = tl.constexpr(P.LOG2E)
LN2_HI = tl.constexpr(P.LN2_HI)
LN2_LO = tl.constexpr(P.LN2_LO)
EXP_HI = tl.constexpr(P.EXP_HI)
EXP_LO = tl.constexpr(P.EXP_LO)
C7, C6, C5, C4, C3, C2, C1, C0 = (tl.constexpr(c) for c in P.EXP_POLY)   # Taylor coefficients, r^7 first
LG1, LG2, LG3, LG4 = (tl.constexpr(c) for c in (P.LG1, P.LG2, P.LG3, P.LG4))   # fdlibm logf polynomial
LN2_HI_LOG = tl.constexpr(P.LN2_HI_LOG)
LN2_LO_LOG = tl.constexpr(P.LN2_LO_LOG)
SQRT_HALF_BITS = tl.constexpr(P.SQRT_HALF_BITS)
ROUND_MAGIC = tl.constexpr(12582912.0)   # 1.5 * 2^23: (x + M) - M rounds |x| < 2^22 to an integer, ties to even
FP8_MAX = tl.constexpr(_FP8_MAX)
FP4_MAX = tl.constexpr(_FP4_MAX)
FP8_AMAX_FLOOR = tl.constexpr(_FP8_AMAX_FLOOR)
FP4_AMAX_FLOOR = tl.constexpr(_FP4_AMAX_FLOOR)


@triton.jit
def lane_tree(acc):
    """[A, B, 16] lane accumulators -> [A, B]: lane i += lane i + 8, then + 4, + 2, + 1."""
    A: tl.constexpr = acc.shape[0]
    B: tl.constexpr = acc.shape[1]
    lo, hi = tl.split(tl.permute(tl.reshape(acc, (A, B, 2, 8)), (0, 1, 3, 2)))
    acc = lo + hi
    lo, hi = tl.split(tl.permute(tl.reshape(acc, (A, B, 2, 4)), (0, 1, 3, 2)))
    acc = lo + hi
    lo, hi = tl.split(tl.permute(tl.reshape(acc, (A, B, 2, 2)), (0, 1, 3, 2)))
    acc = lo + hi
    lo, hi = tl.split(acc)
    return lo + hi


@triton.jit
def split4(x):
    """[A, 64] -> its four [A, 16] column chunks (0-15, 16-31, 32-47, 48-63): a kernel loads 64 columns at once and
    still adds them to its 16 lanes chunk by chunk, in order."""
    A: tl.constexpr = x.shape[0]
    by_chunk = tl.reshape(tl.permute(tl.reshape(x, (A, 4, 16)), (0, 2, 1)), (A, 16, 2, 2))
    even, odd = tl.split(by_chunk)        # chunks {0, 2} and {1, 3}
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def lane_sum_rows4(x):
    """[A, 64] -> [A]: the lane sum of 64 values (4 chunks of 16 lanes) in contract order."""
    A: tl.constexpr = x.shape[0]
    c0, c1, c2, c3 = split4(x)
    lanes = (((tl.zeros_like(c0) + c0) + c1) + c2) + c3
    return tl.reshape(lane_tree(tl.reshape(lanes, (A, 1, 16))), (A,))


@triton.jit
def add_products64(acc, a, b):
    """acc [A, B, 16] lane accumulators += the products a[:, None, k] * b[None, :, k] of one 64-column chunk
    (a [A, 64], b [B, 64]), added 16 columns at a time in increasing order."""
    a0, a1, a2, a3 = split4(a)
    b0, b1, b2, b3 = split4(b)
    acc = acc + a0[:, None, :] * b0[None, :, :]
    acc = acc + a1[:, None, :] * b1[None, :, :]
    acc = acc + a2[:, None, :] * b2[None, :, :]
    return acc + a3[:, None, :] * b3[None, :, :]


@triton.jit
def lane_total(acc):
    """[A, 16] lane accumulators -> [A]: the lane tree of each row."""
    return tl.reshape(lane_tree(tl.reshape(acc, (acc.shape[0], 1, 16))), (acc.shape[0],))


@triton.jit
def add_to_lane(acc, value, i):
    """acc [A, 16] lane accumulators with value [A] added to lane i % 16: term i of a lane sum, in order."""
    return tl.where(tl.arange(0, 16)[None, :] == i % 16, acc + value[:, None], acc)


@triton.jit
def div(a, b):
    """Correctly rounded a / b (both fp32 tensors of one shape)."""
    return tl.math.div_rn(a, b)


@triton.jit
def pow2(e):
    """2^e as fp32 for int32 e in [-126, 127], from the exponent bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def exp(x):
    """The canonical fp32 e^x: Cody-Waite reduction, degree-7 Horner polynomial, 2^n as two exact factors."""
    xc = tl.where(x != x, 0.0, x)
    xc = tl.minimum(tl.maximum(xc, EXP_LO), EXP_HI)
    n = (xc * LOG2E + ROUND_MAGIC) - ROUND_MAGIC
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = tl.full(r.shape, C7, tl.float32)
    p = p * r + C6
    p = p * r + C5
    p = p * r + C4
    p = p * r + C3
    p = p * r + C2
    p = p * r + C1
    p = p * r + C0
    ni = n.to(tl.int32)
    n1 = ni >> 1
    y = (p * pow2(n1)) * pow2(ni - n1)
    return tl.where(x != x, x, y)


@triton.jit
def sigmoid(x):
    """1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, e = exp(-|x|)."""
    e = exp(-tl.abs(x))
    den = e + 1.0
    return tl.where(x >= 0, div(tl.full(x.shape, 1.0, tl.float32), den), div(e, den))


@triton.jit
def log(x):
    """The canonical fp32 natural log (fdlibm logf): x = 2^k * m with m in [sqrt(1/2), sqrt(2)) from the IEEE bits
    (subnormals scaled by 2^25 first), then the polynomial in s = (m-1)/(m+1)."""
    ordinary = (x > 0) & (x < float("inf"))
    subnormal = x < 1.1754943508222875e-38                        # 2^-126
    xs = tl.where(ordinary, tl.where(subnormal, x * 33554432.0, x), 1.0)
    bits = xs.to(tl.int32, bitcast=True) + (0x3F800000 - SQRT_HALF_BITS)
    k = (bits >> 23) - 0x7F - 25 * subnormal.to(tl.int32)
    m = ((bits & 0x7FFFFF) + SQRT_HALF_BITS).to(tl.float32, bitcast=True)
    f = m - 1.0
    s = div(f, f + 2.0)
    z = s * s
    w = z * z
    big_r = z * (w * LG3 + LG1) + w * (w * LG4 + LG2)
    hfsq = (f * 0.5) * f
    dk = k.to(tl.float32)
    y = (((s * (hfsq + big_r) + dk * LN2_LO_LOG) - hfsq) + f) + dk * LN2_HI_LOG
    y = tl.where(x == 0, float("-inf"), y)
    y = tl.where(x == float("inf"), float("inf"), y)
    return tl.where((x < 0) | (x != x), float("nan"), y)


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0, corrected for the rounding of 1 + x."""
    u = x + 1.0
    y = log(u) - div((u - 1.0) - x, u)
    y = tl.where(u == 1.0, x, y)
    return tl.where(x == float("inf"), x, y)


@triton.jit
def softplus(x):
    """max(x, 0) + log1p(exp(-|x|))."""
    return tl.maximum(x, 0.0) + log1p(exp(-tl.abs(x)))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def block_scale(amax, floor, qmax):
    """(scale, 1 / scale) of a quantisation block: 2^ceil(log2(max(amax, floor) / qmax)) from the IEEE bits of the
    correctly rounded quotient (dsv4.formats.block_scales), and its exact inverse."""
    bits = tl.math.div_rn(tl.maximum(amax, floor), tl.full(amax.shape, qmax, tl.float32)).to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True), ((254 - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), as fp32, with v's sign (also on a zero).
    Normal range: round the 23-bit mantissa to 3 bits on the integer bits; below 2^-6 the grid is 2^-9: round
    v * 2^9 with the 2^23 trick."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & ~0xFFFFF).to(tl.float32, bitcast=True)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0) * 0.001953125
    r = tl.where(a < 0.015625, sub, normal)
    sign = v.to(tl.int32, bitcast=True) & -2147483648          # the sign bit, kept on a zero (-x compiles as 0 - x)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_magnitude_code(a):
    """|v| <= 6 -> the e2m1 magnitude code 0..7 of the nearest value of (0, .5, 1, 1.5, 2, 3, 4, 6), ties to the even
    code (dsv4.formats.fp4_codes: strict where the lower code is even, inclusive where it is odd)."""
    return ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))


@triton.jit
def e2m1_code(v):
    """fp32 v with |v| <= 6 -> its e2m1 code (int32 0..15): bit 3 the sign (also of a zero), bits 0-2 the magnitude."""
    return e2m1_magnitude_code(tl.abs(v)) | ((v.to(tl.int32, bitcast=True) >> 28) & 8)


@triton.jit
def fp4_value(code):
    """e2m1 code (int32 0..15) -> fp32 value, built from the bits: bit 3 sign, bits 1-2 exponent e, bit 0 mantissa m.
    e > 0: (1 + m/2) * 2^(e-1), i.e. fp32 exponent field e + 126 and mantissa's top bit m; e = 0: m * 0.5."""
    e = (code >> 1) & 3
    m = code & 1
    bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22)) | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_bf16(x):
    """fp32 -> bf16, round to nearest even on the integer bits (NaN: its top bits made quiet, as torch does)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store(ptr, value, mask, OUT_BF16: tl.constexpr):
    """Store fp32 `value` as bf16 (rounded by `to_bf16`) or as fp32, as the output tensor's dtype asks."""
    if OUT_BF16:
        tl.store(ptr, to_bf16(value), mask=mask)
    else:
        tl.store(ptr, value, mask=mask)
