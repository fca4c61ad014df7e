"""The block formats and the Hadamard rotation in Triton: `fake_quant`, `encode_rows` (the cache's storage form) and
`hadamard`, each one kernel where the canonical composite is a chain of some twenty to forty small torch ops.

All three are exact (integer rounding on the IEEE bits, power-of-two scales, butterflies of fp32 adds): one kernel
serves every level. Rows are independent, so they are also batch-invariant by construction.

- fake_quant / encode_rows: x [R, n] -> blocks of BLOCK values, tile [BLOCK_R, n/BLOCK, BLOCK]; each block's scale
  2^ceil(log2(max(amax, floor) / qmax)), its values rounded to e4m3 or e2m1; fake_quant stores value * scale as
  bf16, encode_rows the codes (e4m3 bytes, or e2m1 nibbles packed two per byte, element 2i low) and the scales.
- hadamard: x [R, n] (n a power of two) -> fp32 butterflies (a + b, a - b) for strides 1, 2, ... n/2, each a
  reshape that puts the pair in the last dim, then one multiply by fp32(n^-1/2) and one cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

BLOCK_R = 4           # rows per program


@triton.jit
def _round_blocks(x, FP4: tl.constexpr):
    """x [R, NB, BLOCK] fp32 -> (grid values [R, NB, BLOCK] fp32 with x's signs, scales [R, NB])."""
    amax = tl.max(tl.abs(x), axis=2)
    if FP4:
        scale, inverse = em.block_scale(amax, em.FP4_AMAX_FLOOR, em.FP4_MAX)
        v = tl.minimum(tl.maximum(x * inverse[:, :, None], -em.FP4_MAX), em.FP4_MAX)
        return em.fp4_value(em.e2m1_code(v)), scale
    scale, inverse = em.block_scale(amax, em.FP8_AMAX_FLOOR, em.FP8_MAX)
    return em.round_e4m3(tl.minimum(tl.maximum(x * inverse[:, :, None], -em.FP8_MAX), em.FP8_MAX)), scale


@triton.jit
def _block_offsets(rows, R, NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """Element offsets [BLOCK_R, NB_PAD, BLOCK / STEP] of each row's blocks (every STEP-th element) and their mask
    (real rows and blocks: NB need not be a power of two)."""
    blocks = tl.arange(0, NB_PAD)
    offsets = rows[:, None, None] * (NB * BLOCK) + blocks[:, None] * BLOCK + STEP * tl.arange(0, BLOCK // STEP)[None, :]
    return offsets, (rows < R)[:, None, None] & (blocks < NB)[None, :, None]


@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, R, NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       FP4: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offsets, mask = _block_offsets(rows, R, NB, NB_PAD, BLOCK, 1)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    values, scale = _round_blocks(x, FP4)
    tl.store(y_ptr + offsets, em.to_bf16(values * scale[:, :, None]), mask=mask)


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, scale_ptr, R, NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   FP4: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if FP4:   # even and odd elements as two tiles, so that each byte's two codes are at hand
        even_offsets, mask = _block_offsets(rows, R, NB, NB_PAD, BLOCK, 2)
        even = tl.load(x_ptr + even_offsets, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(x_ptr + even_offsets + 1, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(even), axis=2), tl.max(tl.abs(odd), axis=2))
        scale, inverse = em.block_scale(amax, em.FP4_AMAX_FLOOR, em.FP4_MAX)
        lo = em.e2m1_code(tl.minimum(tl.maximum(even * inverse[:, :, None], -em.FP4_MAX), em.FP4_MAX))
        hi = em.e2m1_code(tl.minimum(tl.maximum(odd * inverse[:, :, None], -em.FP4_MAX), em.FP4_MAX))
        tl.store(codes_ptr + even_offsets // 2, (lo | (hi << 4)).to(tl.uint8), mask=mask)
    else:
        offsets, mask = _block_offsets(rows, R, NB, NB_PAD, BLOCK, 1)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        values, scale = _round_blocks(x, FP4)
        tl.store(codes_ptr + offsets, values.to(tl.float8e4nv), mask=mask)
    blocks = tl.arange(0, NB_PAD)
    tl.store(scale_ptr + rows[:, None] * NB + blocks[None, :], scale, mask=(rows < R)[:, None] & (blocks < NB)[None, :])


@triton.jit
def _butterfly(y, R: tl.constexpr, N: tl.constexpr, STRIDE: tl.constexpr):
    """One Hadamard stage on y [R, N]: element pairs (i, i + STRIDE) of each 2*STRIDE group become (a + b, a - b)."""
    v = tl.permute(tl.reshape(y, (R, N // (2 * STRIDE), 2, STRIDE)), (0, 1, 3, 2))
    a, b = tl.split(v)                                         # [R, N/(2 STRIDE), STRIDE] each
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, N))


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, R, scale, N: tl.constexpr, LOG_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, N)
    mask = (rows < R)[:, None]
    y = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for level in tl.static_range(LOG_N):             # strides 1, 2, ... N/2
        y = _butterfly(y, BLOCK_R, N, 1 << level)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], em.to_bf16(y * scale), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _blocks(n: int, block: int, fmt: str) -> dict:
    """The kernels' block arguments for rows of n values in blocks of `block` (a power of two)."""
    if fmt not in ("fp8", "fp4"):
        raise DSV4Error(f"quantisation format {fmt!r}: expected 'fp8' or 'fp4'")
    if n % block or block & (block - 1):
        raise DSV4Error(f"the Triton block-format kernels need whole power-of-two blocks; got {n} values in blocks "
                        f"of {block}")
    return dict(NB=n // block, NB_PAD=triton.next_power_of_2(n // block), BLOCK=block, FP4=fmt == "fp4",
                BLOCK_R=BLOCK_R)


def fake_quant(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """The `fake_quant` contract: x [..., n] bf16 -> bf16, each block rounded to e4m3 / e2m1 and scaled back."""
    meta = _blocks(x.shape[-1], block, fmt)
    rows = _rows(x)
    y = torch.empty_like(rows)
    if rows.shape[0]:
        _fake_quant_kernel[(triton.cdiv(rows.shape[0], BLOCK_R),)](rows, y, rows.shape[0], **meta,
                                                                    enable_fp_fusion=False)
    return y.view(x.shape)


def encode_rows(x: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `encode_rows` contract: x [n, q] bf16 on the storage grid -> (codes, fp32 scales [n, q/block])."""
    meta = _blocks(x.shape[-1], block, fmt)
    rows = _rows(x)
    n, q = rows.shape
    codes = (torch.empty(n, q, dtype=torch.float8_e4m3fn, device=x.device) if fmt == "fp8" else
             torch.empty(n, q // 2, dtype=torch.uint8, device=x.device))
    scale = torch.empty(n, q // block, dtype=torch.float32, device=x.device)
    if n:
        _encode_kernel[(triton.cdiv(n, BLOCK_R),)](rows, codes, scale, n, **meta, enable_fp_fusion=False)
    return codes, scale


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The `hadamard` contract: x [..., n] bf16, n a power of two -> bf16."""
    n = x.shape[-1]
    if n & (n - 1):
        raise DSV4Error(f"hadamard needs a power-of-two size, got {n}")
    rows = _rows(x)
    y = torch.empty_like(rows)
    if rows.shape[0]:
        _hadamard_kernel[(triton.cdiv(rows.shape[0], BLOCK_R),)](rows, y, rows.shape[0], n ** -0.5, N=n,
                                                                  LOG_N=n.bit_length() - 1, BLOCK_R=BLOCK_R,
                                                                  enable_fp_fusion=False)
    return y.view(x.shape)
