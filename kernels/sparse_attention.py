"""Sparse attention with an attention sink in Triton, reading the paged KV cache in place: every query attends over
its own index list of rows of one shared K=V head (DeepSeek-V4's sliding window + compressed entries).

Rows come from two sources, as the contract says (backends/contracts.py): a slot value r below R = kv.rows is row r
of the layer's storage (FP8 e4m3 codes times their power-of-two block scale for the non-RoPE dims, bf16 for the RoPE
dims: the bf16 value the model rounded, decoded exactly), R + j is this step's fresh row j of the query's sequence,
-1 is empty. `hca_attention` is the same kernel whose list is the window slots followed by every visible compressed
entry, addressed through the sequence's block table inside the kernel (no index list is built).

Shapes: q [T, H, D] (T = b*s tokens), fresh [b, F, D], idx [T, K]; one program per (token, block of heads) walks the
token's index list in chunks of 64 slots (contracts.ATTENTION_CHUNK). A program never looks at another token, so
both kernels are batch-invariant by construction.

- `fast`: tensor cores. Scores q @ kv_chunk.T [heads, 64] and the value sum p @ kv_chunk, fp32 accumulation, online
  softmax with the hardware exp.
- `exact`: the contract's canonical order on CUDA cores (kernels/exact_math.py): each score is a 16-lane sum over D,
  chunk statistics are 16-lane sums over the 64 slots, probabilities are rounded to bf16 for the value sum, exp is
  the canonical polynomial. The running output lives in an fp32 scratch (the [heads, D] accumulator of a program is
  updated one D block at a time).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsv4.backends.contracts import ATTENTION_CHUNK, KV_FP8_BLOCK
from dsv4.cache import PagedRows
from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

assert ATTENTION_CHUNK == 64, "the kernels below walk index lists in chunks of 64 slots"
EXACT_HEADS = 4        # heads per program in the exact kernel
EXACT_BLOCK_D = 32     # output columns per step of the exact value sum
SPLIT_HEADS = 16        # heads per program in the split kernel (the MMA's M)
SPLIT_CHUNKS = tl.constexpr(2)   # 64-slot chunks per split of the fast kernel: a token's list is shared out over
                                 # programs (flash-decoding); the split bounds depend on the list alone, never on the
                                 # batch, and empty splits add exact zeros, so the kernel stays batch-invariant
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _slots(idx_row, K, first, WIDTH: tl.constexpr, HCA: tl.constexpr, W, table_row, n_comp, pool_base, epb):
    """The index-list slots first .. first+WIDTH-1 of one token ([WIDTH] int64, -1 past the list). HCA: the list is
    the W window slots of idx_row, then the storage rows of compressed entries 0 .. n_comp-1 through table_row."""
    p = first + tl.arange(0, WIDTH)
    if HCA:
        window = tl.load(idx_row + p, mask=p < W, other=-1)
        j = tl.maximum(p - W, 0)
        entry = (p >= W) & (j < n_comp)
        block = tl.load(table_row + j // epb, mask=entry, other=0).to(tl.int64)
        return tl.where(p < W, window, tl.where(entry, pool_base + block * epb + j % epb, -1))
    return tl.load(idx_row + p, mask=p < K, other=-1)


@triton.jit
def _token_lists(token, S, fresh_ptr, F, D, idx_ptr, K, W, table_ptr, n_table, n_comp_ptr, HCA: tl.constexpr):
    """What one token attends over: its sequence's fresh rows, its index list, its sequence's block-table row, its
    number of compressed entries (HCA) and the length of its list (HCA: the window, then the entries; CSA: top-k)."""
    seq = token // S
    if HCA:
        n_comp = tl.load(n_comp_ptr + token)
        length = W + n_comp
    else:
        n_comp = 0
        length = K
    return fresh_ptr + seq * F * D, idx_ptr + token * K, table_ptr + seq * n_table, n_comp, length


@triton.jit
def _rows(codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, slots, cols, D, NOPE: tl.constexpr):
    """fp32 values [n, m] of the rows `slots` [n] at columns `cols` [m] (0 for an empty slot or a column >= D): a
    stored row decodes its FP8 codes times their block scale (exact) and its bf16 RoPE tail; a fresh row is read
    from this step's rows."""
    valid = slots >= 0
    fresh = slots >= n_stored
    stored = (valid & ~fresh)[:, None]
    c = cols[None, :]
    in_codes = c < NOPE
    row = slots[:, None]
    code = tl.load(codes_ptr + row * NOPE + c, mask=stored & in_codes, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + row * (NOPE // 64) + c // 64, mask=stored & in_codes, other=0.0)
    tail = tl.load(tail_ptr + row * (D - NOPE) + (c - NOPE), mask=stored & ~in_codes & (c < D),
                   other=0.0).to(tl.float32)
    new = tl.load(fresh_rows + (row - n_stored) * D + c, mask=(valid & fresh)[:, None] & (c < D),
                  other=0.0).to(tl.float32)
    return tl.where(fresh[:, None], new, tl.where(in_codes, code * scale, tail))


@triton.jit
def _add_value_rows(pv, pr, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, slots, cols, D,
                    NOPE: tl.constexpr):
    """pv [BH, BD, 16] += pr [BH, 16] * row[slot i, cols] for 16 slots (slot i -> lane i)."""
    v = _rows(codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, slots, cols, D, NOPE)   # [16, BD]
    return pv + pr[:, None, :] * tl.trans(v)[None, :, :]


@triton.jit
def _exact_kernel(q_ptr, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_ptr, F,
                  idx_ptr, K, W, table_ptr, n_table, n_comp_ptr, pool_base, epb,
                  sink_ptr, acc_ptr, out_ptr, scale, S, H,
                  D: tl.constexpr, NOPE: tl.constexpr, HCA: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    head_ok = heads < H
    fresh_rows, idx_row, table_row, n_comp, length = _token_lists(token, S, fresh_ptr, F, D, idx_ptr, K, W,
                                                                  table_ptr, n_table, n_comp_ptr, HCA)
    q_rows = q_ptr + (token * H + heads) * D
    acc_rows = acc_ptr + (token * H + heads) * D
    cols64 = tl.arange(0, 64)
    m = tl.full([BH], float("-inf"), tl.float32)
    l = tl.zeros([BH], tl.float32)
    for c0 in range(0, length, 64):
        slots = _slots(idx_row, K, c0, 64, HCA, W, table_row, n_comp, pool_base, epb)
        valid = slots >= 0
        # scores: 16-lane sums of q * kv over D
        dots = tl.zeros([BH, 64, 16], tl.float32)
        for d0 in range(0, D, 64):
            qc = tl.load(q_rows[:, None] + d0 + cols64[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
            kc = _rows(codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, slots, d0 + cols64, D, NOPE)
            dots = em.add_products64(dots, qc, kc)
        s = em.lane_tree(dots) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        if tl.max(valid.to(tl.int32), axis=0) > 0:       # a chunk without a valid slot changes nothing
            m_new = tl.maximum(m, tl.max(s, axis=1))
            corr = em.exp(m - m_new)
            p = em.exp(s - m_new[:, None])
            l = l * corr + em.lane_sum_rows4(p)
            m = m_new
            # the value sum over the 64 slots: lane i takes slots i, i+16, i+32, i+48 (in that order)
            p0, p1, p2, p3 = em.split4(em.to_bf16(p).to(tl.float32))
            s0 = _slots(idx_row, K, c0, 16, HCA, W, table_row, n_comp, pool_base, epb)
            s1 = _slots(idx_row, K, c0 + 16, 16, HCA, W, table_row, n_comp, pool_base, epb)
            s2 = _slots(idx_row, K, c0 + 32, 16, HCA, W, table_row, n_comp, pool_base, epb)
            s3 = _slots(idx_row, K, c0 + 48, 16, HCA, W, table_row, n_comp, pool_base, epb)
            for dd in range(0, D, BD):
                cols = dd + tl.arange(0, BD)
                pv = tl.zeros([BH, BD, 16], tl.float32)
                pv = _add_value_rows(pv, p0, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, s0, cols, D, NOPE)
                pv = _add_value_rows(pv, p1, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, s1, cols, D, NOPE)
                pv = _add_value_rows(pv, p2, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, s2, cols, D, NOPE)
                pv = _add_value_rows(pv, p3, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, s3, cols, D, NOPE)
                acc = tl.load(acc_rows[:, None] + cols[None, :], mask=head_ok[:, None], other=0.0)
                acc = acc * corr[:, None] + em.lane_tree(pv)
                tl.store(acc_rows[:, None] + cols[None, :], acc, mask=head_ok[:, None])
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
    den = l + em.exp(sink - m)
    for dd in range(0, D, BD):
        cols = dd + tl.arange(0, BD)
        acc = tl.load(acc_rows[:, None] + cols[None, :], mask=head_ok[:, None], other=0.0)
        o = em.div(acc, tl.broadcast_to(den[:, None], acc.shape))
        tl.store(out_ptr + (token * H + heads)[:, None] * D + cols[None, :], em.to_bf16(o), mask=head_ok[:, None])


@triton.jit
def _split_kernel(q_ptr, codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_ptr, F,
                 idx_ptr, K, W, table_ptr, n_table, n_comp_ptr, pool_base, epb,
                 part_m_ptr, part_l_ptr, part_acc_ptr, scale, S, H, D, SPLITS,
                 NOPE: tl.constexpr, HCA: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
    """Split `split` of a token's index list (slots [split * 64 * SPLIT_CHUNKS, ...)): its running max, sum and value
    accumulator for a block of heads, in base-2 logits, written for `_combine_kernel`."""
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    split = tl.program_id(2)
    head_ok = heads < H
    cols = tl.arange(0, BD)
    col_ok = cols < D
    fresh_rows, idx_row, table_row, n_comp, length = _token_lists(token, S, fresh_ptr, F, D, idx_ptr, K, W,
                                                                  table_ptr, n_table, n_comp_ptr, HCA)
    q = tl.load(q_ptr + (token * H + heads)[:, None] * D + cols[None, :], mask=head_ok[:, None] & col_ok[None, :],
                other=0.0)
    log2_scale = scale * em.LOG2E
    m = tl.full([BH], float("-inf"), tl.float32)
    l = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BD], tl.float32)
    first = split * 64 * SPLIT_CHUNKS
    for c0 in range(first, tl.minimum(first + 64 * SPLIT_CHUNKS, length), 64):
        slots = _slots(idx_row, K, c0, 64, HCA, W, table_row, n_comp, pool_base, epb)
        valid = slots >= 0
        kv = _rows(codes_ptr, scale_ptr, tail_ptr, n_stored, fresh_rows, slots, cols, D, NOPE).to(tl.bfloat16)
        if UPCAST:      # Triton 3.6's interpreter multiplies bf16 tiles wrongly; fp32 tiles hold the same values
            s = tl.dot(q.to(tl.float32), tl.trans(kv.to(tl.float32))) * log2_scale
        else:
            s = tl.dot(q, tl.trans(kv)) * log2_scale                        # base-2 logits [BH, 64]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * corr + tl.sum(p, axis=1)
        if UPCAST:
            acc = acc * corr[:, None] + tl.dot(p.to(tl.bfloat16).to(tl.float32), kv.to(tl.float32))
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(tl.bfloat16), kv)
        m = m_new
    part = (token * H + heads) * SPLITS + split
    tl.store(part_m_ptr + part, m, mask=head_ok)
    tl.store(part_l_ptr + part, l, mask=head_ok)
    tl.store(part_acc_ptr + part[:, None] * D + cols[None, :], acc, mask=head_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, sink_ptr, out_ptr, H, D, SPLITS, BD: tl.constexpr):
    """One (token, head): the splits' partial softmaxes combined in split order, the sink added, one division."""
    row = tl.program_id(0).to(tl.int64)            # token * H + head
    cols = tl.arange(0, BD)
    col_ok = cols < D
    big = tl.load(part_m_ptr + row * SPLITS)
    for i in range(1, SPLITS):
        big = tl.maximum(big, tl.load(part_m_ptr + row * SPLITS + i))
    big_use = tl.where(big == float("-inf"), 0.0, big)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([BD], tl.float32)
    for i in range(0, SPLITS):
        m_i = tl.load(part_m_ptr + row * SPLITS + i)
        if m_i > float("-inf"):                   # an empty split adds nothing
            weight = tl.exp2(m_i - big_use)
            l += tl.load(part_l_ptr + row * SPLITS + i) * weight
            acc += tl.load(part_acc_ptr + (row * SPLITS + i) * D + cols, mask=col_ok, other=0.0) * weight
    sink = tl.load(sink_ptr + row % H) * em.LOG2E
    o = acc / (l + tl.exp2(sink - big_use))
    tl.store(out_ptr + row * D + cols, o.to(tl.bfloat16), mask=col_ok)


def _launch(kind: str, q: torch.Tensor, kv: PagedRows, fresh: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
            scale: float, hca: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """idx: the index list [b, s, K], or with hca = (block_table, n_comp) the window slots [b, s, W]."""
    b, s, h, d = q.shape
    nope = kv.scale.shape[1] * kv.block
    if fresh.shape[0] != b or fresh.shape[-1] != d or kv.width != d or idx.shape[:2] != (b, s):
        raise DSV4Error(f"sparse_attention: q {tuple(q.shape)}, fresh {tuple(fresh.shape)}, stored rows of width "
                        f"{kv.width} and idx {tuple(idx.shape)} disagree on batch, length or head dim")
    if kv.fmt != "fp8" or kv.block != KV_FP8_BLOCK or d % 64 or nope % 64:
        raise DSV4Error(f"the Triton attention kernels read FP8 rows in blocks of {KV_FP8_BLOCK} with a head dim "
                        f"divisible by 64; got {kv.fmt} blocks of {kv.block}, head dim {d}, {nope} FP8 dims")
    tokens = b * s
    qf = q.reshape(tokens, h, d).contiguous()
    idxf = idx.reshape(tokens, -1).contiguous()
    out = torch.empty(tokens, h, d, dtype=torch.bfloat16, device=q.device)
    if tokens == 0:
        return out.view(b, s, h, d)
    if hca is None:
        table, n_comp = idxf, idxf            # unread: any tensor
        k_slots, window, n_table, pool_base, epb = idxf.shape[1], 0, 0, 0, 1
    else:
        table, n_comp = hca[0].contiguous(), hca[1].reshape(tokens).contiguous()
        k_slots = window = idxf.shape[1]
        n_table, pool_base, epb = table.shape[1], kv.pool_base, kv.entries_per_block
    args = (qf, kv.codes, kv.scale, kv.tail, kv.rows, fresh.contiguous(), fresh.shape[1],
            idxf, k_slots, window, table, n_table, n_comp, pool_base, epb, sink.float().contiguous())
    if kind == "exact":
        acc = torch.zeros(tokens, h, d, dtype=torch.float32, device=q.device)
        _exact_kernel[(tokens, triton.cdiv(h, EXACT_HEADS))](
            *args, acc, out, scale, s, h, D=d, NOPE=nope, HCA=hca is not None, BH=EXACT_HEADS, BD=EXACT_BLOCK_D,
            enable_fp_fusion=False)
    else:
        longest = window + table.shape[1] * epb if hca is not None else k_slots
        splits = max(1, triton.cdiv(longest, 64 * SPLIT_CHUNKS.value))
        part_m = torch.empty(tokens, h, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(tokens, h, splits, d, dtype=torch.float32, device=q.device)
        block_d = triton.next_power_of_2(d)
        _split_kernel[(tokens, triton.cdiv(h, SPLIT_HEADS), splits)](
            *args[:-1], part_m, part_l, part_acc, scale, s, h, d, splits, NOPE=nope, HCA=hca is not None,
            BH=SPLIT_HEADS, BD=block_d, UPCAST=INTERPRETED, num_warps=8,
            num_stages=1)                                     # gathered rows: no multi-buffering (shared memory)
        _combine_kernel[(tokens * h,)](part_m, part_l, part_acc, args[-1], out, h, d, splits, BD=block_d)
    return out.view(b, s, h, d)


def sparse_attention(kind: str):
    """The registry kernel `sparse_attention` of the given kind ('split': tensor cores, flash-decoding splits, batch-invariant; 'exact')."""
    def run(q, kv, fresh, idx, sink, scale):
        return _launch(kind, q, kv, fresh, idx, sink, scale)
    run.__name__ = f"sparse_attention_{kind}"
    return run


def hca_attention(kind: str):
    """The registry kernel `hca_attention` of the given kind: the sparse kernel over the window slots, then every
    visible compressed entry through the block table."""
    def run(q, kv, fresh, window_idx, block_table, n_comp, sink, scale):
        return _launch(kind, q, kv, fresh, window_idx, sink, scale, hca=(block_table, n_comp))
    run.__name__ = f"hca_attention_{kind}"
    return run
