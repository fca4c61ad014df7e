"""The lightning indexer's scores in Triton, reading the FP4 keys of the paged cache in place, in the contract's
canonical order; the top-k selection is shared with the reference (`canonical.ops.select_topk`, integer work only).

S[token, t] = sum_h relu(<q_h, key_t>) * w_h, q [T, H, d] (T = b*s tokens), w [T, H]; key t of the token's sequence
is the storage row keys.entry_rows(block_table, t): e2m1 codes (two per byte) times their power-of-two scale per 32,
decoded exactly. One program per (token, block of BLOCK_T keys) walks the heads in groups of 16: for each group
the dot products are 16-lane sums over d (64 columns decoded and loaded per step, added 16 at a time), and
relu(dot) * w_h goes to lane h % 16 of the head accumulator (group by group: heads h, h+16, ... in order), which
the lane tree finally reduces. A program whose keys are all past the token's visible count does nothing (the
selection never reads those scores).

Why only an exact kernel: the op's output is a set of indices, which every level must reproduce exactly
(contracts: exact_only_output). A tensor-core score rounds differently, and near-ties at the top-k boundary would
then select other entries, so the one kernel serves every level.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.backends.canonical.ops import select_topk
from dsv4.backends.contracts import FP4_BLOCK
from dsv4.cache import PagedRows
from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

assert FP4_BLOCK == 32, "the key decoder below reads one scale per 32 values"
BLOCK_T = 16        # keys per program
HEAD_GROUP = 16     # heads per step: one per lane of the head accumulator


@triton.jit
def _keys(codes_ptr, scale_ptr, rows, row_ok, d0, D: tl.constexpr):
    """fp32 values [BLOCK_T, 64] of the stored keys `rows` at columns d0 .. d0+63 (FP4 codes times their scale)."""
    byte = tl.load(codes_ptr + rows[:, None] * (D // 2) + d0 // 2 + tl.arange(0, 32)[None, :],
                   mask=row_ok[:, None], other=0).to(tl.int32)
    pairs = tl.join(em.fp4_value(byte & 0xF), em.fp4_value((byte >> 4) & 0xF))       # [BLOCK_T, 32, 2]
    values = tl.reshape(pairs, (rows.shape[0], 64))
    cols = d0 + tl.arange(0, 64)
    scale = tl.load(scale_ptr + rows[:, None] * (D // 32) + cols[None, :] // 32, mask=row_ok[:, None], other=0.0)
    return values * scale


@triton.jit
def _scores_kernel(q_ptr, w_ptr, codes_ptr, scale_ptr, table_ptr, visible_ptr, out_ptr, S, H, N, n_table,
                   pool_base, epb, D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    t0 = tl.program_id(1) * BLOCK_T
    if t0 < tl.load(visible_ptr + token):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < N
        block = tl.load(table_ptr + (token // S) * n_table + t // epb, mask=t_ok, other=0).to(tl.int64)
        rows = pool_base + block * epb + t % epb
        cols64 = tl.arange(0, 64)
        group = tl.arange(0, GROUP)
        lanes = tl.zeros([BLOCK_T, GROUP], tl.float32)
        for h0 in range(0, H, GROUP):
            heads = h0 + group
            head_ok = heads < H
            dots = tl.zeros([GROUP, BLOCK_T, 16], tl.float32)
            for d0 in tl.static_range(0, D, 64):
                q = tl.load(q_ptr + (token * H + heads)[:, None] * D + d0 + cols64[None, :], mask=head_ok[:, None],
                            other=0.0).to(tl.float32)
                dots = em.add_products64(dots, q, _keys(codes_ptr, scale_ptr, rows, t_ok, d0, D))
            dot = em.lane_tree(dots)                                                   # [GROUP, BLOCK_T]
            w = tl.load(w_ptr + token * H + heads, mask=head_ok, other=0.0)
            lanes = lanes + tl.trans(tl.maximum(dot, 0.0) * w[:, None])                # heads h0.. in lanes 0..
        score = tl.reshape(em.lane_tree(tl.reshape(lanes, (BLOCK_T, 1, GROUP))), (BLOCK_T,))
        tl.store(out_ptr + token * N + t, score, mask=t_ok)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: PagedRows, block_table: torch.Tensor,
                   n_visible: torch.Tensor) -> torch.Tensor:
    """q [b, s, H, d] bf16, weights [b, s, H] fp32 -> S [b, s, N] fp32 over every key the block table addresses
    (N = its width times the entries per block); scores at t >= n_visible are left unwritten."""
    b, s, h, d = q.shape
    n = block_table.shape[1] * keys.entries_per_block
    if keys.fmt != "fp4" or keys.width != d or block_table.shape[0] != b:
        raise DSV4Error(f"indexer_topk: q {tuple(q.shape)}, keys ({keys.fmt}, width {keys.width}) and block table "
                        f"{tuple(block_table.shape)} disagree")
    if d % 64:
        raise DSV4Error(f"the indexer kernel needs a head dim divisible by 64, got {d}")
    out = torch.empty(b, s, n, dtype=torch.float32, device=q.device)
    if b * s and n:
        _scores_kernel[(b * s, triton.cdiv(n, BLOCK_T))](
            q.contiguous(), weights.float().contiguous(), keys.codes, keys.scale, block_table.contiguous(),
            n_visible.reshape(-1).contiguous(), out, s, h, n, block_table.shape[1], keys.pool_base,
            keys.entries_per_block, D=d, BLOCK_T=BLOCK_T, GROUP=HEAD_GROUP, enable_fp_fusion=False)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: PagedRows, block_table: torch.Tensor,
                 n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """The registry kernel `indexer_topk`: exact scores, then the reference's selection."""
    return select_topk(indexer_scores(q, weights, keys, block_table, n_visible), n_visible, k)
