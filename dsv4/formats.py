"""The official low-precision formats: FP8 e4m3 with ue8m0 block scales, FP4 e2m1 packed two per byte.

Every function here is exact on every device: scales are powers of two computed from IEEE bits, and rounding to
e4m3/e2m1 is round-to-nearest-even on values that are already scaled into range.

Layouts (DeepSeek's checkpoints):
- FP8 weight [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] float8_e8m0fnu (one per 128x128 block).
- FP4 weight [N, K/2] int8 (element 2i in the low nibble, 2i+1 in the high nibble), scale [N, K/32] e8m0.
- FP4 code c: bit 3 is the sign, bits 0-2 index (0, .5, 1, 1.5, 2, 3, 4, 6).
"""
from __future__ import annotations

import torch

from dsv4.backends.contracts import FP4_MAX, FP8_MAX

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_AMAX_FLOOR = 1e-4            # act_quant: amax = max(|x|, 1e-4)
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126


def pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(r)) for positive normal fp32 r, from the IEEE bits (the reference's fast_log2_ceil/fast_pow2)."""
    bits = r.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def block_scales(amax: torch.Tensor, floor: float, qmax: float) -> torch.Tensor:
    """ue8m0 scale of a block: 2^ceil(log2(max(amax, floor) / qmax)), the division an IEEE fp32 one (by a tensor:
    CUDA turns division by a Python number into a reciprocal multiply)."""
    amax = amax.float().clamp_min(floor)
    return pow2_ceil(amax / torch.full_like(amax, qmax))


# -- e8m0 scales -------------------------------------------------------------------------------------------------
def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or its uint8 bits) -> fp32 2^(e-127). Exponent 255 (NaN) is rejected by the loader."""
    e = s.view(torch.uint8).to(torch.int32)
    out = (e << 23).view(torch.float32)
    return torch.where(e == 0, torch.full_like(out, 2.0 ** -127), out)


def float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """Positive power-of-two fp32 scales -> float8_e8m0fnu."""
    e = (s.float().contiguous().view(torch.int32) >> 23) & 0xFF
    return e.to(torch.uint8).view(torch.float8_e8m0fnu)


# -- FP8 e4m3 -----------------------------------------------------------------------------------------------------
def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values already within +-448 to e4m3 (round-to-nearest-even)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_act_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-`block` activation quantisation: (e4m3 [..., K], fp32 scales [..., K/block])."""
    *lead, k = x.shape
    xb = x.float().reshape(*lead, k // block, block)
    scale = block_scales(xb.abs().amax(-1), FP8_AMAX_FLOOR, FP8_MAX)
    q = to_e4m3(xb / scale.unsqueeze(-1))
    return q.reshape(*lead, k), scale


# -- FP4 e2m1 -----------------------------------------------------------------------------------------------------
def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values already within +-6 to e2m1 codes (uint8, round-to-nearest-even).

    The magnitude code counts the midpoints of the grid (0, .5, 1, 1.5, 2, 3, 4, 6) below |x|; at a midpoint the even
    code wins, so the comparison is strict where the lower neighbour's code is even and inclusive where it is odd.
    Comparisons with Python numbers only: no table is copied to the device (a CUDA graph can capture this)."""
    xf = x.float()
    a = xf.abs().clamp(max=FP4_MAX)
    code = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
            + (a >= 3.5).int() + (a > 5.0).int())
    sign = (xf < 0) | ((xf == 0) & torch.signbit(xf))
    return (code | (sign.int() << 3)).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes -> fp32 values, built from the bits: bit 3 sign, bits 1-2 exponent e, bit 0 mantissa m; e > 0 is
    (1 + m/2) * 2^(e-1) (fp32 exponent field e + 126, top mantissa bit m), e = 0 is m * 0.5."""
    c = codes.to(torch.int32)
    e, m = (c >> 1) & 3, c & 1
    bits = torch.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22)) | ((c & 8) << 28)
    return bits.view(torch.float32)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> int8 [..., K/2], element 2i in the low nibble."""
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    return (lo | (hi << 4)).view(torch.int8)


def unpack_fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., K/2] -> uint8 e2m1 codes [..., K] (element 2i from the low nibble)."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., K/2] -> fp32 values [..., K]."""
    return fp4_values(unpack_fp4_codes(packed))


def quantize_blocks(x: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each block of `block` values along the last dim (the reference's act_quant / fp4_act_quant):
    (codes, fp32 power-of-two scales [..., n/block]). Codes are float8_e4m3fn for 'fp8' and uint8 e2m1 codes (one per
    value, unpacked) for 'fp4'."""
    *lead, n = x.shape
    xb = x.float().reshape(*lead, n // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "fp8":
        scale = block_scales(amax, FP8_AMAX_FLOOR, FP8_MAX)
        codes = to_e4m3(xb / scale)
    elif fmt == "fp4":
        scale = block_scales(amax, FP4_AMAX_FLOOR, FP4_MAX)
        codes = fp4_codes(xb / scale)
    else:
        raise ValueError(f"quantisation format {fmt!r}: expected 'fp8' or 'fp4'")
    return codes.reshape(*lead, n), scale.reshape(*lead, n // block)


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, fmt: str, block: int,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """codes [..., n] (as `quantize_blocks` returns them) times their block scales, cast once to `dtype`; exact for
    bf16 and fp32, which hold every e4m3 / e2m1 value times a power-of-two scale."""
    values = codes.float() if fmt == "fp8" else fp4_values(codes)
    *lead, n = values.shape
    out = values.reshape(*lead, n // block, block) * scale.float().unsqueeze(-1)
    return out.reshape(*lead, n).to(dtype)


def fake_quant(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """Quantise each block and dequantise it again (the reference's in-place act_quant / fp4_act_quant)."""
    return dequantize_blocks(*quantize_blocks(x, fmt, block), fmt, block, x.dtype)


# -- weights ------------------------------------------------------------------------------------------------------
def quantize_weight_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], fp32 scales [ceil(N/b), ceil(K/b)]) with one power-of-two scale per b x b block."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    scale = block_scales(blocks.abs().amax(dim=(1, 3)), FP8_AMAX_FLOOR, FP8_MAX)
    q = to_e4m3(blocks / scale[:, None, :, None]).view(nb * block, kb * block)[:n, :k]
    return q.contiguous(), scale


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    n, k = q.shape
    s = scale.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * s


def quantize_weight_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (packed int8 [N, K/2], fp32 scales [N, K/block])."""
    n, k = w.shape
    wb = w.float().view(n, k // block, block)
    scale = block_scales(wb.abs().amax(-1), FP4_AMAX_FLOOR, FP4_MAX)
    codes = fp4_codes(wb / scale.unsqueeze(-1)).view(n, k)
    return pack_fp4(codes), scale


def dequantize_fp4_weight(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    v = unpack_fp4(packed)
    return v * scale.float().repeat_interleave(block, -1)
