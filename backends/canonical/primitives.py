"""Canonical primitives: the exact-level building blocks that give the same bits on every torch device.

Everything here is composed only of operations whose result IEEE-754 fixes completely, so CPU, CUDA and NPU
agree bit for bit:
- single fp32 `+ - * /`, each its own torch op (never a fused one such as addcmul, addmm, lerp, linear, or a
  float matmul, sum, cumsum, exp, log, sigmoid or softmax, whose order or rounding is the device's choice);
- integer arithmetic, comparisons, max/min, indexing, reshapes and casts;
- fp64 matrix products on quantised values, whose block dot products are exact in fp64 in any order.

Three device traps are avoided on purpose, each measured (torch 2.11 on an H100 and on CPU):
- `torch.sqrt` on CPU is not correctly rounded (about 16% of random fp32 inputs differ from IEEE, and CUDA from CPU
  on 0.7%), so `sqrt` here is built from integer arithmetic;
- dividing by a Python number: CUDA turns `t / 3.0` into `t * (1/3.0)` (35% of results differ from CPU), so divisors
  here are always tensors;
- `1 / t` is `t.reciprocal() * 1` in torch, so it is written as a tensor divided by a tensor.
Multiplying or adding a Python number is safe: the number is rounded to fp32 once, like `_f32`.
"""
from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F

from dsv4.backends.contracts import REDUCTION_LANES

# Elements of one [rows, cols, lanes] fp32 temporary (16 MiB); bounds the memory of the vectorised loops.
BUDGET = 1 << 22


def _f32(value: float) -> float:
    """The Python float rounded to the nearest fp32 (what torch does with a scalar operand)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _bits(word: int) -> float:
    """The fp32 whose IEEE bits are `word`."""
    return struct.unpack("<f", struct.pack("<I", word))[0]


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for int32 e in [-126, 127], from the exponent bits."""
    return ((e + 127) << 23).view(torch.float32)


# -- reductions ---------------------------------------------------------------------------------------------------
def _lane_tree(acc: torch.Tensor) -> torch.Tensor:
    """Pairwise tree over the last (lane) dim: lane i += lane i + L/2, halving until one lane is left."""
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


def lane_sum(x: torch.Tensor, dim: int = -1, lanes: int = REDUCTION_LANES) -> torch.Tensor:
    """fp32 sum over `dim` in the contract order: lane i adds x[i], x[i+L], ... from +0.0, then the lane tree.

    Missing elements of the last chunk count as +0.0 (padding with +0.0 is the same thing: a lane is never -0.0).
    """
    assert lanes & (lanes - 1) == 0, "lanes must be a power of two"
    x = x.movedim(dim, -1)
    pad = -x.shape[-1] % lanes
    if pad:
        x = F.pad(x, (0, pad))
    chunks = x.unflatten(-1, (-1, lanes))
    acc = torch.zeros(chunks.shape[:-2] + (lanes,), dtype=torch.float32, device=x.device)
    for c in range(chunks.shape[-2]):
        acc = acc + chunks[..., c, :]
    return _lane_tree(acc)


def float_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[..., n] = lane-order sum over K of the fp32 products x[..., k] * w[n, k] (the `linear` contract).

    Vectorised over [rows, cols, lanes] accumulators, one K chunk of L at a time; rows and cols are processed in
    slices so a temporary stays within BUDGET elements. Slicing never changes a result: each output element has
    its own accumulator.
    """
    *lead, k = x.shape
    n = w.shape[0]
    lanes = REDUCTION_LANES
    xf = x.reshape(-1, k).float()
    wf = w.float()
    pad = -k % lanes
    if pad:
        xf, wf = F.pad(xf, (0, pad)), F.pad(wf, (0, pad))
    xc, wc = xf.unflatten(-1, (-1, lanes)), wf.unflatten(-1, (-1, lanes))
    m = xc.shape[0]
    rows = max(1, min(m, BUDGET // lanes))
    cols = max(1, BUDGET // (rows * lanes))
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    for r0 in range(0, m, rows):
        for c0 in range(0, n, cols):
            xs, ws = xc[r0:r0 + rows, None], wc[None, c0:c0 + cols]
            acc = torch.zeros(xs.shape[0], ws.shape[1], lanes, dtype=torch.float32, device=x.device)
            for c in range(xc.shape[1]):
                acc = acc + xs[:, :, c] * ws[:, :, c]
            out[r0:r0 + rows, c0:c0 + cols] = _lane_tree(acc)
    return out.reshape(*lead, n)


def block_major(wq: torch.Tensor, block: int) -> torch.Tensor:
    """Weight values [..., N, K] -> fp64 [..., K/block, block, N], the layout `block_sums` multiplies with."""
    *lead, n, k = wq.shape
    return wq.double().reshape(*lead, n, k // block, block).movedim(-3, -1).contiguous()


def block_sums(xq: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """[M, K] activations x block-major weights [K/block, block, N] -> exact block sums [M, K/block, N] in fp32.

    The operands hold e4m3 or e2m1 values: their products lie on a fixed binary grid and a block's sum needs fewer
    than 53 bits, so the fp64 matrix multiply is exact whatever order the device sums in; each sum is rounded once."""
    nb, block, _ = wb.shape
    xb = xq.double().reshape(xq.shape[0], nb, block).transpose(0, 1)                 # [nb, M, block]
    return torch.bmm(xb, wb).float().transpose(0, 1)


# -- transcendentals ----------------------------------------------------------------------------------------------
LOG2E = _f32(1.4426950408889634)
LN2_HI = 0.693145751953125            # 15 significant bits: n * LN2_HI is exact for |n| <= 2^9
LN2_LO = _f32(math.log(2.0) - LN2_HI)
EXP_POLY = [_f32(1.0 / math.factorial(i)) for i in range(7, -1, -1)]   # Taylor to r^7, highest first
EXP_HI = 89.0      # exp(89) overflows fp32: every larger x gives inf through the same arithmetic
EXP_LO = -104.0    # exp(-104) < 2^-150 rounds to +0: every smaller x gives +0 through the same arithmetic


def exp(x: torch.Tensor) -> torch.Tensor:
    """fp32 e^x (max error about 1 ulp): Cody-Waite reduction, Horner polynomial, exact 2^n scaling.

    x = n ln2 + r with n = round-half-even(x log2e) and |r| <= ~0.35; e^r by a degree-7 Taylor polynomial; then
    2^n applied as two exact power-of-two factors 2^(n//2) * 2^(n - n//2), so a subnormal result is rounded once.
    """
    x = x.float()
    xc = torch.where(torch.isnan(x), 0.0, x).clamp(EXP_LO, EXP_HI)
    n = torch.round(xc * LOG2E)
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = torch.full_like(r, EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + c
    ni = n.to(torch.int32)
    n1 = ni >> 1
    y = (p * _pow2(n1)) * _pow2(ni - n1)
    return torch.where(torch.isnan(x), x, y)


# fdlibm/musl logf: log(1+f) = f - hfsq + s*(hfsq + R(s^2)), s = f/(2+f), R a minimax fit of the atanh series.
LG1, LG2, LG3, LG4 = 0xAAAAAA / 2.0 ** 24, 0xCCCE13 / 2.0 ** 25, 0x91E9EE / 2.0 ** 25, 0xF89E26 / 2.0 ** 26
LN2_HI_LOG = _bits(0x3F317180)
LN2_LO_LOG = _bits(0x3717F7D1)
SQRT_HALF_BITS = 0x3F3504F3           # fp32 bits of sqrt(1/2)


def log(x: torch.Tensor) -> torch.Tensor:
    """fp32 natural log (max error about 1 ulp): log(0) = -inf, log(x < 0) = NaN, log(inf) = inf.

    x = 2^k * m with m in [sqrt(1/2), sqrt(2)) from the IEEE bits (subnormals are first scaled by 2^25), then
    log(m) by the fdlibm polynomial in s = (m-1)/(m+1), each multiply and add a separate fp32 operation.
    """
    x = x.float()
    ordinary = (x > 0) & (x < math.inf)
    subnormal = x < 2.0 ** -126
    xs = torch.where(ordinary, torch.where(subnormal, x * 2.0 ** 25, x), torch.ones_like(x))
    bits = xs.view(torch.int32) + (0x3F800000 - SQRT_HALF_BITS)
    k = (bits >> 23) - 0x7F - 25 * subnormal.to(torch.int32)
    m = ((bits & 0x7FFFFF) + SQRT_HALF_BITS).view(torch.float32)
    f = m - 1.0
    s = f / (f + 2.0)
    z = s * s
    w = z * z
    big_r = z * (w * LG3 + LG1) + w * (w * LG4 + LG2)
    hfsq = (f * 0.5) * f
    dk = k.float()
    y = (((s * (hfsq + big_r) + dk * LN2_LO_LOG) - hfsq) + f) + dk * LN2_HI_LOG
    y = torch.where(x == 0, -math.inf, y)
    y = torch.where(x == math.inf, math.inf, y)
    return torch.where((x < 0) | torch.isnan(x), math.nan, y)


def log1p(x: torch.Tensor) -> torch.Tensor:
    """fp32 log(1 + x) for x >= 0: log(u) - ((u - 1) - x) / u with u = 1 + x, corrected for the rounding of u."""
    x = x.float()
    u = x + 1.0
    y = log(u) - ((u - 1.0) - x) / u
    y = torch.where(u == 1.0, x, y)
    return torch.where(x == math.inf, x, y)


def _isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for int64 0 <= n < 2^50, digit by digit (one result bit per step, exact)."""
    res = torch.zeros_like(n)
    bit = 1 << 48
    while bit:
        trial = res + bit
        fits = n >= trial
        n = torch.where(fits, n - trial, n)
        res = torch.where(fits, (res >> 1) + bit, res >> 1)
        bit >>= 2
    return res


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root from integer arithmetic (IEEE: sqrt(-0) = -0, sqrt(x < 0) = NaN).

    x = m * 2^e with m a 24-bit integer (subnormals first scaled by 2^24) and e made even by shifting m into
    [2^24, 2^26); r = isqrt(m * 2^24) has 25 bits, and (r + 1) >> 1 rounds it to 24. An odd r can never be an exact
    root (m * 2^24 is even), so a guard bit of 1 always means "above the midpoint": no tie rule is needed.
    """
    x = x.float()
    ordinary = (x > 0) & (x < math.inf)
    subnormal = x < 2.0 ** -126
    xs = torch.where(ordinary, torch.where(subnormal, x * 2.0 ** 24, x), torch.ones_like(x))
    bits = xs.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 150
    m = (bits & 0x7FFFFF) | 0x800000
    shift = 2 - (e & 1)
    r = _isqrt((m << shift) << 24)
    q = (r + 1) >> 1
    exponent = ((e - shift) >> 1) - 11 - 12 * subnormal.to(torch.int64)
    y = q.float() * _pow2(exponent.to(torch.int32))
    y = torch.where((x == 0) | (x == math.inf), x, y)
    return torch.where((x < 0) | torch.isnan(x), math.nan, y)


def rsqrt(x: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(x), both correctly rounded."""
    return torch.ones_like(x) / sqrt(x)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, with e = exp(-|x|): never overflows, so tiny results
    for very negative x keep their precision."""
    e = exp(-x.abs())
    den = e + 1.0
    return torch.where(x >= 0, torch.ones_like(x) / den, e / den)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) + log1p(exp(-|x|)): no overflow for large |x|."""
    return x.clamp_min(0.0) + log1p(exp(-x.abs()))


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x)."""
    return x * sigmoid(x)


# -- selection ----------------------------------------------------------------------------------------------------
def topk_lower_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest along the last dim, in descending order, ties to the lower index (NaN not expected).

    Adding +0.0 turns -0.0 into +0.0 first, so a device whose sort orders by bit pattern still sees them tie.
    """
    values, indices = torch.sort(scores + 0.0, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


# -- counter-based random numbers ---------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF
_HASH_IV = 0x243F6A88                  # first digits of pi: keeps the all-zero key away from the hash's fixed point


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 a in [0, 2^32), by 16-bit halves of c: no intermediate reaches 2^63."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit avalanche hash (Wellons' lowbias32) on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def _words(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high 32-bit words of int64 values (two's complement), each in [0, 2^32)."""
    return v & _MASK32, (v >> 32) & _MASK32


def counter_uniform(seed: int, request: torch.Tensor, position: torch.Tensor, n: int,
                    device: torch.device | str) -> torch.Tensor:
    """[b, n] fp32 uniforms in (0, 1) keyed by (seed, request[b], position[b], i): the same bits on every device.

    The key's 32-bit words are absorbed one by one through `_mix32`; element i is mix32(mix32(h ^ i)). The top 23
    bits k give U = (k + 0.5) / 2^23, exactly representable (odd numerator below 2^24), never 0 or 1.
    """
    seed &= (1 << 64) - 1
    request = request.to(device=device, dtype=torch.int64)
    position = position.to(device=device, dtype=torch.int64)
    h = torch.full_like(request, _HASH_IV)
    for word in (seed & _MASK32, seed >> 32, *_words(request), *_words(position)):
        h = _mix32(h ^ word)
    i = torch.arange(n, dtype=torch.int64, device=device)
    k = _mix32(_mix32(h[:, None] ^ i)) >> 9
    return (2 * k + 1).float() * 2.0 ** -24
