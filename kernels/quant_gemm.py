"""Block-scaled quantised GEMMs in Triton: y[M, N] = x[M, K] @ W[N, K].T with FP8 (e4m3, 128x128 scales) or packed
FP4 (e2m1, 1x32 scales) weights, as DeepSeek-V4's Linear layers compute them.

Activations are quantised inside the kernel, per row and per 128-wide K block, exactly as the contract says
(`dsv4.formats.quantize_act_fp8`): scale = 2^ceil(log2(max(amax, 1e-4) / 448)) from the IEEE bits, then
q = e4m3(x / scale), rounded to nearest-even by integer arithmetic on the fp32 bits, so the GPU and Triton's CPU
interpreter give the same bits.

Three kernels, one per promise:
- `exact`: the op contract bit for bit (backends/contracts.py, quant_linear). Each weight-scale block's dot product
  (K = 128 for FP8 weights, 32 for FP4) is formed in fp64 on CUDA cores: e4m3 x e4m3 and e4m3 x e2m1 products are
  exact in fp64 and a block's sum needs < 53 bits, so it is exact whatever order the lanes add in. It is rounded once
  to fp32, scaled (activation scale, then weight scale) and accumulated over K blocks in increasing order, with FP
  fusion disabled.
- `invariant`: FP8 tensor cores (`tl.dot` on e4m3, fp32 accumulate) per weight-scale block, scaled and accumulated in
  fp32 (DeepGEMM's "promoted accumulation"), with a fixed row tile: no split-K, a fixed K block and one MMA shape, so
  a row's bits do not depend on the other rows (declared batch-invariant; `dsv4 verify` checks it).
- `fast`: the same with the row tile chosen by batch size.

Tiles: BLOCK_M rows x BLOCK_N columns per program. Dense GEMMs derive their rows from the program id; grouped (MoE)
GEMMs pass a tile table (expert, first row, row count) so that tiles never straddle experts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.backends.contracts import FP4_BLOCK, FP8_BLOCK
from dsv4.kernels import exact_math as em

TARGET_PROGRAMS = 264       # about two programs per SM of an H100 (132 SMs): enough to stream the weights
MAX_INVARIANT_SPLITS = 8    # batch-invariant split-K depends on the shape only; this bounds its partial-sum traffic


@triton.jit
def _fp4_value(code):
    """e2m1 code (int32 0..15) -> fp32 value: bit 3 sign, bits 1-2 exponent, bit 0 mantissa."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    normal = (1.0 + 0.5 * m) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0))
    value = tl.where(e == 0, 0.5 * m, normal)
    return tl.where(code >= 8, -value, value)


@triton.jit
def _round_e4m3(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), as fp32. Normal range: round the 23-bit
    mantissa to 3 bits on the integer bits; below 2^-6 the grid is 2^-9: round v * 2^9 with the 2^23 trick."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & ~0xFFFFF).to(tl.float32, bitcast=True)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0) * 0.001953125
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(v < 0, -r, r)


@triton.jit
def _act_scale(x_ptr, rows, row_ok, K, kb):
    """ue8m0 scale [BLOCK_M] of the rows' activations in K block kb (128 wide)."""
    ks = kb * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    bits = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)).to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _act_chunk(x_ptr, rows, row_ok, K, k_idx, scale):
    """The rows' activations at columns k_idx, quantised to e4m3 with their block scale: fp32 [BLOCK_M, len(k_idx)]."""
    x = tl.load(x_ptr + rows[:, None] * K + k_idx[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    v = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    return _round_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))


@triton.jit
def _weights(w_base, cols, col_ok, K, k_idx, FP4: tl.constexpr):
    """Weight values at columns k_idx for output features cols: fp32 [BLOCK_N, len(k_idx)] (e4m3 or e2m1 values)."""
    if FP4:   # two codes per byte: even k in the low nibble, odd k in the high nibble
        byte = tl.load(w_base + cols[:, None] * (K // 2) + k_idx[None, :] // 2, mask=col_ok[:, None],
                       other=0).to(tl.int32) & 0xFF
        return _fp4_value(tl.where(k_idx[None, :] % 2 == 0, byte & 0xF, byte >> 4))
    return tl.load(w_base + cols[:, None] * K + k_idx[None, :], mask=col_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _weight_scale(s_base, cols, col_ok, K, kb, wb, FP4: tl.constexpr):
    """Scales [BLOCK_N] of weight-scale block wb inside 128-block kb (FP4: 1x32 per row; FP8: 128x128)."""
    if FP4:
        return tl.load(s_base + cols * (K // 32) + kb * 4 + wb, mask=col_ok, other=0.0)
    return tl.load(s_base + (cols // 128) * (K // 128) + kb, mask=col_ok, other=0.0)


@triton.jit
def _tile(tile_expert_ptr, tile_row_ptr, tile_rows_ptr, M, DENSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, row count) of this program's row tile."""
    tile = tl.program_id(0)
    if DENSE:
        expert = tl.load(tile_expert_ptr)             # the one expert: a [1] int32 zero
        row0 = tile * BLOCK_M
        n_rows = tl.minimum(M - row0, BLOCK_M)
    else:
        expert = tl.load(tile_expert_ptr + tile)
        row0 = tl.load(tile_row_ptr + tile)
        n_rows = tl.load(tile_rows_ptr + tile)
    return expert, row0, n_rows


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, sw_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_rows_ptr,
                 M, N, K, stride_we, stride_se, blocks_per_split, DENSE: tl.constexpr, FP4: tl.constexpr,
                 EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr):
    expert, row0, n_rows = _tile(tile_expert_ptr, tile_row_ptr, tile_rows_ptr, M, DENSE, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_base = w_ptr + expert * stride_we
    s_base = sw_ptr + expert * stride_se
    WB: tl.constexpr = 32 if FP4 else 128                  # K width of one weight-scale block
    split = tl.program_id(2)                               # this program's share of the K blocks (split-K)
    kb_first = split * blocks_per_split
    kb_end = tl.minimum(kb_first + blocks_per_split, K // 128)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_first, kb_end):
        sx = _act_scale(x_ptr, rows, row_ok, K, kb)
        for wb in tl.static_range(0, 128 // WB):
            k0 = kb * 128 + wb * WB
            if EXACT:   # exact block sum in fp64, SUB_K columns at a time
                block_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
                for kk in tl.static_range(0, WB, SUB_K):
                    k_idx = k0 + kk + tl.arange(0, SUB_K)
                    q = _act_chunk(x_ptr, rows, row_ok, K, k_idx, sx).to(tl.float64)
                    w = _weights(w_base, cols, col_ok, K, k_idx, FP4).to(tl.float64)
                    block_sum += tl.sum(q[:, None, :] * w[None, :, :], axis=2)
                part = block_sum.to(tl.float32)
            else:       # FP8 tensor cores, fp32 accumulate
                k_idx = k0 + tl.arange(0, WB)
                q = _act_chunk(x_ptr, rows, row_ok, K, k_idx, sx).to(tl.float8e4nv)
                w = _weights(w_base, cols, col_ok, K, k_idx, FP4).to(tl.float8e4nv)
                part = tl.dot(q, tl.trans(w), out_dtype=tl.float32)
            term = (part * sx[:, None]) * _weight_scale(s_base, cols, col_ok, K, kb, wb, FP4)[None, :]
            if EXACT and wb == 0:     # the contract starts from the first block's term, not from +0.0
                if kb == 0:
                    acc = term
                else:
                    acc = acc + term
            else:
                acc = acc + term
    tl.store(y_ptr + split * M * N + rows[:, None] * N + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, y_ptr, MN, SPLITS, BLOCK: tl.constexpr):
    """y = partial[0] + partial[1] + ... in split order (a fixed order: deterministic), cast once to bf16."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(partial_ptr + i, mask=i < MN, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(partial_ptr + s * MN + i, mask=i < MN, other=0.0)
    tl.store(y_ptr + i, em.to_bf16(acc), mask=i < MN)


def _tile_table(counts: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(expert, first row, row count) for every BLOCK_M tile of every expert's rows."""
    expert, row, size, start = [], [], [], 0
    for e, c in enumerate(counts):
        for r in range(0, c, block_m):
            expert.append(e); row.append(start + r); size.append(min(block_m, c - r))
        start += c
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (expert, row, size))


def _launch(kind: str, x: torch.Tensor, counts: list[int] | None, weight: torch.Tensor,
            scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] bf16 (grouped: rows in expert order, `counts` per expert), weight [E, N, K or K/2] -> [T, N] bf16."""
    t, k = x.shape
    fp4 = weight.dtype == torch.int8
    n = weight.shape[1]
    if k % FP8_BLOCK:
        raise ValueError(f"quant GEMM: K={k} must be a multiple of {FP8_BLOCK}")
    y = torch.empty(t, n, dtype=torch.bfloat16, device=x.device)
    if t == 0:
        return y
    largest = t if counts is None else max(counts)
    if kind == "exact":
        block_m, block_n, sub_k, warps = min(16, triton.next_power_of_2(largest)), 32, 4, 4
    else:   # "fast" picks the row tile by batch size; "invariant" keeps it fixed, so the MMA shape never changes
        block_m = 16 if kind == "invariant" or largest <= 16 else 64
        block_n, sub_k, warps = 64 if largest <= 16 else 128, FP4_BLOCK, 4
    if counts is None:
        zero = torch.zeros(1, dtype=torch.int32, device=x.device)
        tiles, n_tiles = (zero, zero, zero), triton.cdiv(t, block_m)
    else:
        tiles = _tile_table(counts, block_m, x.device)
        n_tiles = tiles[0].numel()
    col_tiles, k_blocks = triton.cdiv(n, block_n), k // FP8_BLOCK
    splits = _splits(kind, n_tiles, col_tiles, k_blocks, grouped=counts is not None)
    per_split = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, per_split)
    partial = torch.empty(splits, t, n, dtype=torch.float32, device=x.device)
    _gemm_kernel[(n_tiles, col_tiles, splits)](
        x, weight, scale, partial, *tiles, t, n, k, weight.stride(0), scale.stride(0), per_split,
        DENSE=counts is None, FP4=fp4, EXACT=kind == "exact", BLOCK_M=block_m, BLOCK_N=block_n, SUB_K=sub_k,
        num_warps=warps, enable_fp_fusion=kind != "exact")
    block = 1024
    _sum_splits_kernel[(triton.cdiv(t * n, block),)](partial, y, t * n, splits, BLOCK=block)
    return y


def _splits(kind: str, row_tiles: int, col_tiles: int, k_blocks: int, grouped: bool) -> int:
    """How many K ranges to split the GEMM into (split-K), so that small batches still occupy every SM.

    exact: 1 (its contract accumulates the K blocks in one sequence). invariant: from the weight shape only (as if
    one row tile), so a row's bits never depend on the batch. fast: from the whole grid. Grouped (MoE) GEMMs have a
    tile per expert and batch, enough programs already: 1."""
    if kind == "exact" or grouped:
        return 1
    if kind == "invariant":
        return max(1, min(k_blocks, MAX_INVARIANT_SPLITS, TARGET_PROGRAMS // col_tiles))
    return max(1, min(k_blocks, TARGET_PROGRAMS // (row_tiles * col_tiles)))


def quant_linear(kind: str):
    """The registry kernel `quant_linear` of the given kind ('fast', 'invariant' or 'exact')."""
    def run(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        *lead, k = x.shape
        y = _launch(kind, x.reshape(-1, k).contiguous(), None, weight.unsqueeze(0),
                    scale.float().contiguous().unsqueeze(0))
        return y.reshape(*lead, weight.shape[0])
    run.__name__ = f"quant_linear_{kind}"
    return run


def grouped_quant_linear(kind: str):
    """The registry kernel `grouped_quant_linear` of the given kind."""
    def run(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _launch(kind, x.contiguous(), counts.tolist(), weight, scale.float().contiguous())
    run.__name__ = f"grouped_quant_linear_{kind}"
    return run
