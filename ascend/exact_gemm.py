"""The exact quantised GEMMs without fp64: integer block dot products, then the canonical fp32 tail.

The `quant_linear` contract forms each K block's dot product exactly, rounds it once to fp32, then scales and
accumulates the blocks in fp32 in increasing order. The canonical composite gets the exact block sums from an fp64
matrix multiply; Ascend has no fp64, so here they come from integers:

- FP8 e4m3 activations and weights times 2^9 are integers below 2^18 (`e4m3`); FP4 e2m1 weights times 2 are integers
  in [-12, 12]. A block's dot product times 2^18 (FP8 weights) or 2^10 (FP4 weights) is an integer below 2^43.
- Each operand is split into base-2^7 digits that fit int8 (`digits`), so every digit product is an int8 x int8
  matrix multiply with int32 results: the operation Ascend's cube unit runs natively (torch_npu.npu_quant_matmul
  with output_dtype=int32). A digit block sum is below 127 * 127 * 128 < 2^21: no overflow, and exact even if a
  device accumulated it in fp32. The digit sums are recombined in int64.
- The int64 block sum is rounded to fp32 with round-to-nearest-even in integer arithmetic (`int64_to_float32`), so
  no device conversion is trusted; the power-of-two factor back is exact.

From there the scaling and the block accumulation are the canonical fp32 operations in the canonical order, so the
result is the canonical `quant_linear`'s bits (`tests/test_ascend_exact.py` checks that bit for bit on CPU).
"""
from __future__ import annotations

from typing import Callable

import torch

from dsv4.backends.canonical.ops import scale_and_accumulate
from dsv4.backends.canonical.primitives import BUDGET
from dsv4.backends.contracts import FP4_BLOCK, FP8_BLOCK
from dsv4.backends.npu import e4m3

IntBmm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # int8 [B, M, k] x int8 [B, k, N] -> int32 [B, M, N]

MAX_BMM_COLS = 65535            # torch_npu.npu_quant_matmul: "x1 and x2 last dim must not exceed 65535"
DIGIT_BITS = 7
ACT_DIGITS = 3                   # |e4m3 * 2^9| < 2^18 needs three base-2^7 digits
FP8_WEIGHT_DIGITS = 3
FP4_WEIGHT_DIGITS = 1            # 2 * e2m1 is in [-12, 12]: already one int8 digit
_FP4_TIMES_TWO = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)   # code -> 2 * value (formats.FP4_VALUES)


def torch_int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Digit products with torch's int32 batched matmul (CPU and any device that has one)."""
    return torch.bmm(a.to(torch.int32), b.to(torch.int32))


def npu_int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Digit products on the NPU cube: torch_npu.npu_quant_matmul with int8 x1, x2, a float32 scale of 1 and
    output_dtype=torch.int32 (Ascend/op-plugin docs/context/torch_npu-npu_quant_matmul.md, table 2, last row:
    Atlas A2/A3). Not yet run on an NPU."""
    import torch_npu

    one = torch.ones(1, dtype=torch.float32, device=a.device)
    return torch_npu.npu_quant_matmul(a, b, one, output_dtype=torch.int32)


# -- operands as integers -----------------------------------------------------------------------------------------
def fp8_weight_int(weight: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [N, K] -> int32 value * 2^9, read from the bits (no float8 arithmetic)."""
    return e4m3.decode(weight.contiguous().view(torch.uint8))


def fp4_weight_int(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 int8 [N, K/2] (element 2i in the low nibble) -> int32 2 * value [N, K]."""
    b = packed.contiguous().view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    table = torch.tensor(_FP4_TIMES_TWO, dtype=torch.int32, device=packed.device)
    return table[codes]


def digits(v: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [...] -> int8 [count, ...] with v = sum_i d_i * 2^(7 i): low digits in [0, 127], the top one signed,
    so `count` digits hold -2^(7 count) <= v < 2^(7 count)."""
    out = [(v >> (DIGIT_BITS * i)) & 127 for i in range(count - 1)] + [v >> (DIGIT_BITS * (count - 1))]
    return torch.stack(out).to(torch.int8)


# -- exact block sums ---------------------------------------------------------------------------------------------
def block_sums(a: torch.Tensor, b: torch.Tensor, block: int, a_digits: int, b_digits: int,
               int_bmm: IntBmm) -> torch.Tensor:
    """Exact per-K-block dot products: int32 [M, K] x int32 [N, K] -> int64 [M, K/block, N].

    All digit pairs go through one batched int8 matmul: [K/block, da*M, block] x [K/block, block, db*N].
    """
    m, k = a.shape
    n, nb = b.shape[0], k // block
    ad = digits(a, a_digits).reshape(a_digits * m, nb, block).transpose(0, 1)      # [nb, da*M, block]
    bd = digits(b, b_digits).reshape(b_digits * n, nb, block).permute(1, 2, 0)     # [nb, block, db*N]
    products = int_bmm(ad.contiguous(), bd.contiguous()).to(torch.int64).view(nb, a_digits, m, b_digits, n)
    total = torch.zeros(nb, m, n, dtype=torch.int64, device=a.device)
    for i in range(a_digits):
        for j in range(b_digits):
            total += products[:, i, :, j, :] << (DIGIT_BITS * (i + j))
    return total.transpose(0, 1)


def int64_to_float32(s: torch.Tensor) -> torch.Tensor:
    """Round int64 values below 2^62 in magnitude to the nearest fp32 (ties to even), in integer arithmetic."""
    magnitude = s.abs()
    top = torch.zeros_like(magnitude)                 # floor(log2 |s|), 0 for s = 0
    for step in (32, 16, 8, 4, 2, 1):
        top = top + step * ((magnitude >> (top + step)) != 0).to(torch.int64)
    drop = (top - 23).clamp_min(0)                    # keep 24 significant bits
    kept = magnitude >> drop
    rest = magnitude & ((1 << drop) - 1)
    half = (1 << drop) >> 1
    up = (drop > 0) & ((rest > half) | ((rest == half) & ((kept & 1) == 1)))
    kept = kept + up.to(torch.int64)                  # <= 2^24: exact in fp32
    value = kept.to(torch.float32) * ((drop + 127) << 23).to(torch.int32).view(torch.float32)
    return torch.where(s < 0, -value, value)


# -- the ops ------------------------------------------------------------------------------------------------------
def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 int_bmm: IntBmm = torch_int_bmm) -> torch.Tensor:
    """The `quant_linear` contract, bit for bit as the canonical composite, with integer block dot products."""
    *lead, k = x.shape
    xi, x_scale = e4m3.quantize_act(x.reshape(-1, k))
    if weight.dtype == torch.float8_e4m3fn:
        n, block, w_digits, unit = weight.shape[0], FP8_BLOCK, FP8_WEIGHT_DIGITS, 2.0 ** -(2 * e4m3.SHIFT)
        w_int = fp8_weight_int
        w_scale = scale.float().repeat_interleave(FP8_BLOCK, dim=0)[:n]              # [N, K/128]
    elif weight.dtype == torch.int8:
        n, block, w_digits, unit = weight.shape[0], FP4_BLOCK, FP4_WEIGHT_DIGITS, 2.0 ** -(e4m3.SHIFT + 1)
        w_int = fp4_weight_int
        w_scale = scale.float()                                                       # [N, K/32]
        x_scale = x_scale.repeat_interleave(FP8_BLOCK // FP4_BLOCK, dim=-1)          # [M, K/32]
    else:
        raise ValueError(f"quant_linear: weight dtype {weight.dtype} is neither float8_e4m3fn nor packed-fp4 int8")
    m, nb = xi.shape[0], k // block
    pairs = ACT_DIGITS * w_digits                     # the int64 digit products hold pairs * rows * nb * cols values
    cols = min(n, max(1, BUDGET // (nb * pairs)), MAX_BMM_COLS // w_digits)
    rows = max(1, BUDGET // (nb * cols * pairs))
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    for c0 in range(0, n, cols):
        w = w_int(weight[c0:c0 + cols])
        for r0 in range(0, m, rows):
            exact = block_sums(xi[r0:r0 + rows], w, block, ACT_DIGITS, w_digits, int_bmm)
            sums = int64_to_float32(exact) * unit                                    # exact: a power of two
            y[r0:r0 + rows, c0:c0 + cols] = scale_and_accumulate(sums, x_scale[r0:r0 + rows],
                                                                  w_scale[c0:c0 + cols]).to(torch.bfloat16)
    return y.reshape(*lead, n)


def grouped_quant_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         int_bmm: IntBmm = torch_int_bmm) -> torch.Tensor:
    """Rows sorted by expert: the counts[e] rows of block e go through `quant_linear` with expert e's weight."""
    y = torch.empty(x.shape[0], weight.shape[1], dtype=torch.bfloat16, device=x.device)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            y[start:start + count] = quant_linear(x[start:start + count], weight[e], scale[e], int_bmm)
        start += count
    return y


def npu_quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quant_linear` with the digit products on the NPU cube."""
    return quant_linear(x, weight, scale, npu_int_bmm)


def npu_grouped_quant_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """`grouped_quant_linear` with the digit products on the NPU cube."""
    return grouped_quant_linear(x, counts, weight, scale, npu_int_bmm)
