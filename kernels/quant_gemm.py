"""Block-scaled quantised GEMMs in Triton: y[M, N] = x[M, K] @ W[N, K].T with FP8 (e4m3, 128x128 scales) or packed
FP4 (e2m1, 1x32 scales) weights, as DeepSeek-V4's Linear layers compute them.

Activations are first quantised by a small kernel, once per row and 128-wide K block, exactly as the contract says
(`dsv4.formats.quantize_act_fp8`): scale = 2^ceil(log2(max(amax, 1e-4) / 448)) from the IEEE bits, then
q = e4m3(x / scale), rounded to nearest-even by integer arithmetic on the fp32 bits, so the GPU and Triton's CPU
interpreter give the same bits. The GEMM programs then read the e4m3 codes (not re-quantising per column tile).

Three kernels, one per promise:
- `exact`: the op contract bit for bit (backends/contracts.py, quant_linear). Each weight-scale block's dot product
  (K = 128 for FP8 weights, 32 for FP4) is formed exactly on int8 tensor cores: the e4m3 / e2m1 values, scaled to
  integers, are cut into int8 slices whose products sum exactly in int32 and combine in int64 (the route
  exactness.md names; 9 slice products per FP8 block, 3 per FP4 block). It is rounded once to fp32, scaled
  (activation scale, then weight scale) and accumulated over K blocks in increasing order, with FP fusion disabled.
- `invariant`: FP8 tensor cores (`tl.dot` on e4m3, fp32 accumulate) per weight-scale block, scaled and accumulated in
  fp32 (DeepGEMM's "promoted accumulation"), with one tile shape for every batch and a split-K that depends on the
  weight shape only, so a row's bits do not depend on the other rows (declared batch-invariant; `dsv4 verify`
  checks it).
- `fast`: the same with the tile shape and the split chosen from the batch size.

Tiles: BLOCK_M rows x BLOCK_N columns x one K range per program (split-K: small batches have few row tiles, so the
K blocks are shared out to occupy every SM). Each program writes its fp32 partial sum; a second kernel adds the
partials in split order (a fixed order) and rounds once to bf16. Dense GEMMs derive their rows from the program id;
grouped (MoE) GEMMs pass a tile table (expert, first row, row count) so that tiles never straddle experts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.backends.contracts import FP8_BLOCK
from dsv4.kernels import exact_math as em
from dsv4.kernels.occupancy import target_programs

MAX_INVARIANT_SPLITS = 8    # batch-invariant split-K depends on the shape only; this bounds its partial-sum traffic
EXACT_TERMS_BYTES = 32 << 20   # the exact kernel splits K only while every block term of the GEMM fits in this
PROGRAMS_PER_SM = 8         # a decode GEMM streams a weight once: many short K ranges keep more loads in flight


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, K):
    """One row's 128-wide K block: ue8m0 scale 2^ceil(log2(max(amax, FP8_AMAX_FLOOR) / FP8_MAX)) and the e4m3 codes
    of x / scale (dividing by a power of two is multiplying by its exact inverse)."""
    row, kb = tl.program_id(0).to(tl.int64), tl.program_id(1)    # 64-bit offsets
    ks = kb * 128 + tl.arange(0, 128)[None, :]                  # a [1, 128] tile: one row
    x = tl.load(x_ptr + row * K + ks).to(tl.float32)
    scale, inverse = em.block_scale(tl.max(tl.abs(x), axis=1), em.FP8_AMAX_FLOOR, em.FP8_MAX)   # [1]
    q = em.round_e4m3(tl.minimum(tl.maximum(x * inverse[:, None], -em.FP8_MAX), em.FP8_MAX))
    tl.store(q_ptr + row * K + ks, q.to(tl.float8e4nv))          # exact: q is an e4m3 value
    tl.store(s_ptr + row * (K // 128) + kb + tl.arange(0, 1), scale)


@triton.jit
def _act_codes(xq_ptr, rows, row_ok, K, k_first, WIDTH: tl.constexpr):
    """The rows' e4m3 activation codes at columns k_first .. k_first+WIDTH-1: [BLOCK_M, WIDTH] float8."""
    k_idx = k_first + tl.arange(0, WIDTH)
    return tl.load(xq_ptr + rows[:, None] * K + k_idx[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def _weights(w_base, cols, col_ok, K, k_first, WIDTH: tl.constexpr, FP4: tl.constexpr):
    """Weight values at columns k_first .. k_first+WIDTH-1 for output features cols: fp32 [BLOCK_N, WIDTH] (e4m3 or
    e2m1 values)."""
    if FP4:   # two codes per byte: even k in the low nibble, odd k in the high nibble; each byte is loaded once
        b = k_first // 2 + tl.arange(0, WIDTH // 2)
        byte = tl.load(w_base + cols[:, None] * (K // 2) + b[None, :], mask=col_ok[:, None], other=0).to(tl.int32)
        pairs = tl.join(em.fp4_value(byte & 0xF), em.fp4_value((byte >> 4) & 0xF))          # [BLOCK_N, WIDTH/2, 2]
        return tl.reshape(pairs, (cols.shape[0], WIDTH))
    k_idx = k_first + tl.arange(0, WIDTH)
    return tl.load(w_base + cols[:, None] * K + k_idx[None, :], mask=col_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _weight_scale(s_base, cols, col_ok, K, kb, wb, FP4: tl.constexpr):
    """Scales [BLOCK_N] of weight-scale block wb inside 128-block kb (FP4: 1x32 per row; FP8: 128x128)."""
    if FP4:
        return tl.load(s_base + cols * (K // 32) + kb * 4 + wb, mask=col_ok, other=0.0)
    return tl.load(s_base + (cols // 128) * (K // 128) + kb, mask=col_ok, other=0.0)


@triton.jit
def _int8_slices(v):
    """Integers |v| < 2^18 (int32) -> int8 (a, b, c) with v = a * 2^14 + b * 2^7 + c, b and c in [-64, 63]."""
    c = ((v + 64) & 127) - 64
    v = (v - c) >> 7
    b = ((v + 64) & 127) - 64
    a = (v - b) >> 7
    return a.to(tl.int8), b.to(tl.int8), c.to(tl.int8)


@triton.jit
def _exact_block_dot(q, w, FP4: tl.constexpr):
    """The exact dot products of one weight-scale block, rounded once to fp32: q [BLOCK_M, WB] e4m3 activation values,
    w [BLOCK_N, WB] e4m3 or e2m1 weight values (fp32) -> [BLOCK_M, BLOCK_N].

    Scaled to integers (e4m3 * 2^9 and e2m1 * 2: |v| < 2^18 and <= 12), the operands are cut into int8 slices; int8
    tensor cores multiply slice pairs exactly into int32, and the slice products are shifted and added in int64, so
    the block sum is exact whatever order the hardware adds in. Converting it to fp32 is the one rounding."""
    qa, qb, qc = _int8_slices((q * 512.0).to(tl.int32))
    if FP4:   # e2m1 * 2 is already an int8
        wt = tl.trans((w * 2.0).to(tl.int32).to(tl.int8))
        s = ((tl.dot(qa, wt, out_dtype=tl.int32) << 14) + (tl.dot(qb, wt, out_dtype=tl.int32) << 7)
             + tl.dot(qc, wt, out_dtype=tl.int32))            # |s| < 32 * 2^18 * 12: fits int32
        return s.to(tl.float32) * 0.0009765625                 # 2^-10, exact
    wa, wb, wc = _int8_slices((w * 512.0).to(tl.int32))
    wa, wb, wc = tl.trans(wa), tl.trans(wb), tl.trans(wc)
    top = tl.dot(qa, wa, out_dtype=tl.int32).to(tl.int64)
    d21 = (tl.dot(qa, wb, out_dtype=tl.int32) + tl.dot(qb, wa, out_dtype=tl.int32)).to(tl.int64)
    d14 = (tl.dot(qa, wc, out_dtype=tl.int32) + tl.dot(qb, wb, out_dtype=tl.int32)
           + tl.dot(qc, wa, out_dtype=tl.int32)).to(tl.int64)
    d7 = (tl.dot(qb, wc, out_dtype=tl.int32) + tl.dot(qc, wb, out_dtype=tl.int32)).to(tl.int64)
    low = tl.dot(qc, wc, out_dtype=tl.int32).to(tl.int64)
    s = (top << 28) + (d21 << 21) + (d14 << 14) + (d7 << 7) + low
    return s.to(tl.float32) * 3.814697265625e-06               # 2^-18, exact


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
def _gemm_kernel(xq_ptr, xs_ptr, w_ptr, sw_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_rows_ptr,
                 M, N, K, stride_we, stride_se, blocks_per_split, DENSE: tl.constexpr, FP4: tl.constexpr,
                 EXACT: tl.constexpr, TERMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    expert, row0, n_rows = _tile(tile_expert_ptr, tile_row_ptr, tile_rows_ptr, M, DENSE, BLOCK_M)
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)           # 64-bit offsets: tensors may exceed 2^31 elements
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we       # V4-Pro's expert stack exceeds 2^31 bytes
    s_base = sw_ptr + expert.to(tl.int64) * stride_se
    WB: tl.constexpr = 32 if FP4 else 128                  # K width of one weight-scale block
    split = tl.program_id(2)                               # this program's share of the K blocks (split-K)
    kb_first = split * blocks_per_split
    kb_end = tl.minimum(kb_first + blocks_per_split, K // 128)
    kb_end = tl.where(n_rows > 0, kb_end, kb_first)       # a padding tile of the grouped table does nothing
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_first, kb_end):
        sx = tl.load(xs_ptr + rows * (K // 128) + kb, mask=row_ok, other=0.0)
        for wb in tl.static_range(0, 128 // WB):
            k0 = kb * 128 + wb * WB
            if EXACT:   # the exact block sum from int8 tensor cores on sliced integer operands
                q = _act_codes(xq_ptr, rows, row_ok, K, k0, WB).to(tl.float32)
                w = _weights(w_base, cols, col_ok, K, k0, WB, FP4)
                part = _exact_block_dot(q, w, FP4)
            else:       # FP8 tensor cores, fp32 accumulate
                q = _act_codes(xq_ptr, rows, row_ok, K, k0, WB)
                w = _weights(w_base, cols, col_ok, K, k0, WB, FP4).to(tl.float8e4nv)
                part = tl.dot(q, tl.trans(w), out_dtype=tl.float32)
            term = (part * sx[:, None]) * _weight_scale(s_base, cols, col_ok, K, kb, wb, FP4)[None, :]
            if TERMS:     # exact split-K: every block term stored in its place, summed in order afterwards
                index = kb * (128 // WB) + wb            # < 2^31 elements: the terms fit EXACT_TERMS_BYTES
                tl.store(y_ptr + index * M * N + rows[:, None] * N + cols[None, :], term,
                         mask=row_ok[:, None] & col_ok[None, :])
            elif EXACT and wb == 0:     # the contract starts from the first block's term, not from +0.0
                if kb == 0:
                    acc = term
                else:
                    acc = acc + term
            else:
                acc = acc + term
    if not TERMS:
        tl.store(y_ptr + split.to(tl.int64) * M * N + rows[:, None] * N + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, y_ptr, MN, SPLITS, BLOCK: tl.constexpr):
    """y = partial[0] + partial[1] + ... in order (a fixed order: deterministic; for the exact kernel's block terms,
    the contract's order), cast once to bf16."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ptr = partial_ptr + i
    acc = tl.load(ptr, mask=i < MN, other=0.0)
    for s in range(1, SPLITS):
        ptr += MN                                          # pointer steps: 64-bit however large the partials
        acc += tl.load(ptr, mask=i < MN, other=0.0)
    tl.store(y_ptr + i, em.to_bf16(acc), mask=i < MN)


def tile_bound(rows: int, n_experts: int, block_m: int) -> int:
    """The most BLOCK_M row tiles `rows` rows spread over `n_experts` experts can need: each expert with rows adds at
    most one partial tile, and at most min(rows, experts) experts have rows (a batch-1 token hits top-k of them)."""
    return triton.cdiv(rows, block_m) + min(rows, n_experts)


def _tile_table(counts: torch.Tensor, block_m: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first row, row count) [n] int32 of every BLOCK_M tile of every expert's rows, built on the device (no
    host sync, so a grouped GEMM can be captured in a CUDA graph). n = tile_bound(...) bounds the number of tiles
    whatever the counts; the tiles past the last one have 0 rows and do nothing, so only the experts a batch hits
    are read."""
    n_experts = counts.numel()
    i = torch.arange(tile_bound(rows, n_experts, block_m), device=counts.device)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    expert = torch.searchsorted(tile_end, i, right=True).clamp_max(n_experts - 1)
    local = i - (tile_end - tiles)[expert]
    first_row = (torch.cumsum(counts, 0) - counts)[expert] + local * block_m
    row_count = torch.where(i < tile_end[-1], (counts[expert] - local * block_m).clamp(0, block_m), 0)
    return expert.int(), first_row.int(), row_count.int()


def _launch(kind: str, x: torch.Tensor, counts: torch.Tensor | None, weight: torch.Tensor,
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
    rows_per_group = t if counts is None else t // counts.numel()     # grouped: the mean rows per expert
    if kind in ("exact", "invariant") or rows_per_group < 64:
        block_m, block_n = 16, 64     # exact / invariant: one tile shape for every batch (the MMA never changes)
    else:
        block_m, block_n = 64, 128    # fast, many rows per weight (prefill)
    if counts is None:
        zero = torch.zeros(1, dtype=torch.int32, device=x.device)
        tiles, n_tiles = (zero, zero, zero), triton.cdiv(t, block_m)
    else:
        tiles = _tile_table(counts.to(x.device), block_m, t)
        n_tiles = tiles[0].numel()
    col_tiles, k_blocks = triton.cdiv(n, block_n), k // FP8_BLOCK
    target = target_programs(x.device, PROGRAMS_PER_SM)
    n_terms = k // (32 if fp4 else 128)
    splits = _splits(kind, n_tiles, col_tiles, k_blocks, target, t * n * n_terms * 4 <= EXACT_TERMS_BYTES)
    per_split = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, per_split)
    terms = kind == "exact" and splits > 1
    xq = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty(t, k_blocks, dtype=torch.float32, device=x.device)
    _quantize_kernel[(t, k_blocks)](x, xq, xs, k)
    partial = torch.empty(n_terms if terms else splits, t, n, dtype=torch.float32, device=x.device)
    _gemm_kernel[(n_tiles, col_tiles, splits)](
        xq, xs, weight, scale, partial, *tiles, t, n, k, weight.stride(0), scale.stride(0), per_split,
        DENSE=counts is None, FP4=fp4, EXACT=kind == "exact", TERMS=terms, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, enable_fp_fusion=kind != "exact")
    block = 1024
    _sum_splits_kernel[(triton.cdiv(t * n, block),)](partial, y, t * n, partial.shape[0], BLOCK=block)
    return y


def _splits(kind: str, row_tiles: int, col_tiles: int, k_blocks: int, target: int, terms_fit: bool) -> int:
    """How many K ranges to split the GEMM into (split-K), so that small batches still occupy every SM.

    exact: its contract accumulates the block terms in one sequence, so a split stores every term and one pass adds
    them in order (same bits for any split): used while the terms fit in EXACT_TERMS_BYTES. invariant: from the
    weight shape only (as if one row tile), so a row's bits never depend on the batch or on how the rows spread over
    experts. fast: from the whole grid."""
    if kind == "exact":
        return max(1, min(k_blocks, target // (row_tiles * col_tiles))) if terms_fit else 1
    if kind == "invariant":
        return max(1, min(k_blocks, MAX_INVARIANT_SPLITS, target // col_tiles))
    return max(1, min(k_blocks, target // (row_tiles * col_tiles)))


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
        return _launch(kind, x.contiguous(), counts, weight, scale.float().contiguous())
    run.__name__ = f"grouped_quant_linear_{kind}"
    return run
