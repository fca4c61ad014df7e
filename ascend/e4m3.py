"""FP8 e4m3 without a float8 dtype: decoding and round-to-nearest-even in integer arithmetic.

Atlas A2/A3 NPUs have no FP8 arithmetic, and torch-npu refuses float8 tensors in its operators ("Float8_e4m3fn has
not been supported", ConvertToAclDataType; xLLM-AI/xllm#1427). Every e4m3 value times 2^9 is an integer of at most
18 bits (the smallest subnormal is 2^-9, the largest value 448 = 14 * 2^5), so the codes can be handled as int32:
decoding reads the bits of a uint8 view, and rounding an fp32 value to the e4m3 grid is done on its IEEE bits. Both
give exactly what torch's float8_e4m3fn casts give on CPU; `tests/test_ascend_exact.py` checks that bit for bit.
"""
from __future__ import annotations

import torch

from dsv4 import formats
from dsv4.backends.contracts import FP8_BLOCK, FP8_MAX

SHIFT = 9                       # e4m3 value * 2^SHIFT is an integer
_ONE_OVER = 2.0 ** -SHIFT       # exact fp32 factor back from the integer


def decode(bits: torch.Tensor) -> torch.Tensor:
    """e4m3 codes (a uint8 view of float8_e4m3fn storage) -> int32 value * 2^9. NaN codes are not expected:
    quantised checkpoints and activations never hold them."""
    b = bits.view(torch.uint8).to(torch.int32)
    exponent, mantissa = (b >> 3) & 15, b & 7
    magnitude = torch.where(exponent == 0, mantissa, (mantissa | 8) << (exponent - 1).clamp_min(0))
    return torch.where(b >= 128, -magnitude, magnitude)


def round_to_int(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int32 value * 2^9 of the nearest e4m3 value (ties to even), after clamping to +-448 like
    `formats.to_e4m3`. NaN is not representable here: see `round_e4m3` for the float result that keeps it."""
    bits = x.float().clamp(-FP8_MAX, FP8_MAX).contiguous().view(torch.int32).to(torch.int64)
    negative = bits < 0
    biased = (bits >> 23) & 0xFF
    significand = torch.where(biased > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    # |x| = significand * 2^(max(biased, 1) - 150). The e4m3 grid near |x| has spacing 2^quantum with
    # quantum = max(E, -6) - 3, E = biased - 127: the low `drop` bits of the significand are rounded away.
    quantum = (biased - 127).clamp_min(-6) - 3
    drop = (quantum - (biased.clamp_min(1) - 150)).clamp_max(30)   # >= 20; 30 already rounds any significand to 0
    kept = significand >> drop
    rest = significand & ((1 << drop) - 1)
    half = 1 << (drop - 1)
    kept = kept + ((rest > half) | ((rest == half) & ((kept & 1) == 1))).to(torch.int64)
    magnitude = kept << (quantum + SHIFT)                          # quantum + 9 >= 0
    return torch.where(negative, -magnitude, magnitude).to(torch.int32)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp32 holding the nearest e4m3 value: `formats.to_e4m3(x).float()` without a float8 dtype."""
    x = x.float()
    magnitude = round_to_int(x).abs().float() * _ONE_OVER
    return torch.where(torch.isnan(x), x, torch.copysign(magnitude, x))     # copysign keeps -0.0 of tiny negatives


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128 activation quantisation as `formats.quantize_act_fp8`: (int32 e4m3 value * 2^9 [..., K],
    fp32 power-of-two scales [..., K/128])."""
    *lead, k = x.shape
    xb = x.float().reshape(*lead, k // FP8_BLOCK, FP8_BLOCK)
    scale = formats.block_scales(xb.abs().amax(-1), formats.FP8_AMAX_FLOOR, FP8_MAX)
    return round_to_int(xb / scale.unsqueeze(-1)).reshape(*lead, k), scale


def fake_quant(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """The `fake_quant` op: as `formats.fake_quant`, with the e4m3 rounding done in integer arithmetic (fp4 needs no
    float8 dtype and goes through `formats` as is)."""
    if fmt != "fp8":
        return formats.fake_quant(x, fmt, block)
    *lead, n = x.shape
    xb = x.float().reshape(*lead, n // block, block)
    scale = formats.block_scales(xb.abs().amax(-1, keepdim=True), formats.FP8_AMAX_FLOOR, FP8_MAX)
    return (round_e4m3(xb / scale) * scale).reshape(*lead, n).to(x.dtype)
