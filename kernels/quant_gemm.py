"""Block-scaled quantised GEMMs in Triton: y[M, N] = x[M, K] @ W[N, K].T with FP8 (e4m3, 128x128 scales) or packed
FP4 (e2m1, 1x32 scales) weights and e4m3 activations (1x128 scales), as DeepSeek-V4's Linear layers compute them.

Two kernels, one per promise:
- `exact`: the op contract bit for bit (backends/contracts.py, quant_linear). Each K block's dot product is formed in
  fp64 on CUDA cores: e4m3 x e4m3 and e4m3 x e2m1 products are exact in fp64 and a block's sum needs < 53 bits, so
  the block sum is exact whatever order the lanes add in. It is rounded once to fp32, scaled (activation scale first,
  then weight scale) and accumulated over K blocks in increasing order with FP fusion disabled: the same bits as the
  CPU reference on any device.
- `fast`: FP8 tensor cores (`tl.dot` on e4m3, fp32 accumulate) per K block, scaled and accumulated in fp32 (the
  DeepGEMM "promoted accumulation"), with a row tile chosen by batch size.
- `invariant`: the same with a fixed row tile: no split-K, a fixed K block and one MMA shape, so a row's bits do not
  depend on the other rows (declared batch-invariant; `dsv4 verify` checks it).

Shapes: x is quantised per token beforehand (`quantize_act_fp8`, exact everywhere). Tiles: BLOCK_M rows x BLOCK_N
columns per program; the K loop walks the scale blocks in order. Grouped (MoE) GEMMs pass a tile table: each tile's
expert, first row and row count, so tiles never straddle experts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.backends.contracts import FP4_BLOCK, FP8_BLOCK
from dsv4.formats import quantize_act_fp8


@triton.jit
def _fp4_value(code):
    """e2m1 code (int32 0..15) -> fp64 value: bit 3 sign, bits 1-2 exponent, bit 0 mantissa."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float64)
    normal = (1.0 + 0.5 * m) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0))
    value = tl.where(e == 0, 0.5 * m, normal)
    return tl.where(code >= 8, -value, value)


@triton.jit
def _exact_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_rows_ptr,
                       N, K, n_blocks, stride_we, stride_se,
                       FP4: tl.constexpr, block: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SUB_K: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    n_rows = tl.load(tile_rows_ptr + tile)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_base = w_ptr + expert * stride_we
    s_base = sw_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, n_blocks):
        exact = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        for kk in tl.static_range(0, block, SUB_K):
            ks = kb * block + kk + tl.arange(0, SUB_K)
            if FP4:   # two codes per byte: even k in the low nibble, odd k in the high nibble
                half = kb * (block // 2) + kk // 2 + tl.arange(0, SUB_K // 2)
                packed = tl.load(w_base + cols[:, None] * (K // 2) + half[None, :], mask=col_ok[:, None], other=0)
                byte = packed.to(tl.int32) & 0xFF
                x_even = tl.load(x_ptr + rows[:, None] * K + (kb * block + kk + 2 * tl.arange(0, SUB_K // 2))[None, :],
                                 mask=row_ok[:, None], other=0.0).to(tl.float32).to(tl.float64)
                x_odd = tl.load(x_ptr + rows[:, None] * K + (kb * block + kk + 1 + 2 * tl.arange(0, SUB_K // 2))[None, :],
                                mask=row_ok[:, None], other=0.0).to(tl.float32).to(tl.float64)
                lo = _fp4_value(byte & 0xF)
                hi = _fp4_value(byte >> 4)
                exact += tl.sum(x_even[:, None, :] * lo[None, :, :], axis=2)
                exact += tl.sum(x_odd[:, None, :] * hi[None, :, :], axis=2)
            else:
                xs = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
                ws = tl.load(w_base + cols[:, None] * K + ks[None, :], mask=col_ok[:, None], other=0.0)
                exact += tl.sum(xs.to(tl.float32).to(tl.float64)[:, None, :] * ws.to(tl.float32).to(tl.float64)[None, :, :],
                               axis=2)
        if FP4:
            sx = tl.load(sx_ptr + rows * (K // 128) + (kb * block) // 128, mask=row_ok, other=0.0)
            sw = tl.load(s_base + cols * (K // block) + kb, mask=col_ok, other=0.0)
        else:
            sx = tl.load(sx_ptr + rows * (K // 128) + kb, mask=row_ok, other=0.0)
            sw = tl.load(s_base + (cols // 128) * (K // 128) + kb, mask=col_ok, other=0.0)
        term = (exact.to(tl.float32) * sx[:, None]) * sw[None, :]
        if kb == 0:
            acc = term
        else:
            acc = acc + term
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fast_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_rows_ptr,
                      N, K, n_blocks, stride_we, stride_se,
                      FP4: tl.constexpr, block: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    n_rows = tl.load(tile_rows_ptr + tile)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_base = w_ptr + expert * stride_we
    s_base = sw_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, n_blocks):
        ks = kb * block + tl.arange(0, block)
        xs = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        if FP4:
            half = kb * (block // 2) + tl.arange(0, block // 2)
            byte = tl.load(w_base + cols[:, None] * (K // 2) + half[None, :], mask=col_ok[:, None], other=0).to(tl.int32) & 0xFF
            pair = tl.join(_fp4_value(byte & 0xF), _fp4_value(byte >> 4))       # [BN, block/2, 2]
            ws = tl.reshape(pair, [BLOCK_N, block]).to(tl.float32).to(tl.float8e4nv)   # e2m1 values are exact in e4m3
            sx = tl.load(sx_ptr + rows * (K // 128) + (kb * block) // 128, mask=row_ok, other=0.0)
            sw = tl.load(s_base + cols * (K // block) + kb, mask=col_ok, other=0.0)
        else:
            ws = tl.load(w_base + cols[:, None] * K + ks[None, :], mask=col_ok[:, None], other=0.0)
            sx = tl.load(sx_ptr + rows * (K // 128) + kb, mask=row_ok, other=0.0)
            sw = tl.load(s_base + (cols // 128) * (K // 128) + kb, mask=col_ok, other=0.0)
        part = tl.dot(xs, tl.trans(ws), out_dtype=tl.float32)
        acc += part * sx[:, None] * sw[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def _tiles(counts: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(expert, first row, row count) for every BLOCK_M tile of every expert's row range."""
    expert, row, size, start = [], [], [], 0
    for e, c in enumerate(counts):
        for r in range(0, c, block_m):
            expert.append(e); row.append(start + r); size.append(min(block_m, c - r))
        start += c
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    return as_tensor(expert), as_tensor(row), as_tensor(size)


def _launch(kind: str, x: torch.Tensor, counts: list[int], weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] bf16 (rows grouped by expert), weight [E, N, K or K/2], scale [E, ...] -> [T, N] bf16."""
    t, k = x.shape
    fp4 = weight.dtype == torch.int8
    block = FP4_BLOCK if fp4 else FP8_BLOCK
    n = weight.shape[1]
    if k % FP8_BLOCK:
        raise ValueError(f"quant GEMM: K={k} must be a multiple of {FP8_BLOCK}")
    xq, sx = quantize_act_fp8(x, FP8_BLOCK)
    # fp32 out, one cast in torch: the same RNE on every device (Triton's interpreter truncates to bf16)
    y = torch.empty(t, n, dtype=torch.float32, device=x.device)
    if t == 0:
        return y.to(torch.bfloat16)
    if kind == "exact":
        block_m = min(16, triton.next_power_of_2(max(1, max(counts))))
        block_n = 32
        tiles = _tiles(counts, block_m, x.device)
        grid = (tiles[0].numel(), triton.cdiv(n, block_n))
        _exact_gemm_kernel[grid](xq, sx, weight, scale.float().contiguous(), y, *tiles, n, k, k // block,
                                 weight.stride(0), scale.stride(0), FP4=fp4, block=block, BLOCK_M=block_m, BLOCK_N=block_n,
                                 SUB_K=4, num_warps=4, enable_fp_fusion=False)
    else:   # "fast" picks the row tile by batch size; "invariant" keeps it fixed, so the MMA shape never changes
        block_m = 16 if kind == "invariant" or max(counts) <= 16 else 64
        block_n = 128
        tiles = _tiles(counts, block_m, x.device)
        grid = (tiles[0].numel(), triton.cdiv(n, block_n))
        _fast_gemm_kernel[grid](xq, sx, weight, scale.float().contiguous(), y, *tiles, n, k, k // block,
                                weight.stride(0), scale.stride(0), FP4=fp4, block=block, BLOCK_M=block_m, BLOCK_N=block_n,
                                num_warps=4)
    return y.to(torch.bfloat16)


def quant_linear(kind: str):
    """The registry kernel `quant_linear` of the given kind ('fast', 'invariant' or 'exact')."""
    def run(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        *lead, k = x.shape
        rows = x.reshape(-1, k).contiguous()
        y = _launch(kind, rows, [rows.shape[0]], weight.unsqueeze(0), scale.float().unsqueeze(0))
        return y.reshape(*lead, weight.shape[0])
    run.__name__ = f"quant_linear_{kind}"
    return run


def grouped_quant_linear(kind: str):
    """The registry kernel `grouped_quant_linear` of the given kind."""
    def run(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _launch(kind, x.contiguous(), counts.tolist(), weight, scale.float())
    run.__name__ = f"grouped_quant_linear_{kind}"
    return run
