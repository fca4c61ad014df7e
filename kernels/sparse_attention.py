"""Sparse attention with an attention sink in Triton: every query attends over its own index list of rows of one
shared K=V head (DeepSeek-V4's sliding window + compressed entries). `hca_attention` is the same kernel over the
window indices followed by every visible compressed entry.

Shapes: q [T, H, D] (T = b*s tokens), kv [b, N, D], idx [T, K] (-1: empty slot), sink [H]; one program per
(token, block of heads) walks the token's index list in chunks of 64 slots (contracts.ATTENTION_CHUNK). A program
never looks at another token, so both kernels are batch-invariant by construction.

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

from dsv4.backends.canonical.ops import hca_indices
from dsv4.backends.contracts import ATTENTION_CHUNK
from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

assert ATTENTION_CHUNK == 64, "the kernels below walk index lists in chunks of 64 slots"
EXACT_HEADS = 4        # heads per program in the exact kernel
EXACT_BLOCK_D = 32     # output columns per step of the exact value sum
FAST_HEADS = 16        # heads per program in the fast kernel (the MMA's M)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_value_row(pv, pr, kv_base, idx_row, first, K, cols, D: tl.constexpr):
    """pv [BH, BD, 16] += pr [BH, 16] * kv[slot first + i, cols] for the 16 slots first .. first+15 (lane i)."""
    lanes = tl.arange(0, 16)
    slots = tl.load(idx_row + first + lanes, mask=first + lanes < K, other=-1)
    v = tl.load(kv_base + slots[None, :] * D + cols[:, None], mask=(slots >= 0)[None, :], other=0.0)
    return pv + pr[:, None, :] * v.to(tl.float32)[None, :, :]


@triton.jit
def _exact_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, acc_ptr, out_ptr, scale, S, H, N, K,
                  D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    head_ok = heads < H
    kv_base = kv_ptr + (token // S) * N * D
    q_rows = q_ptr + (token * H + heads) * D
    acc_rows = acc_ptr + (token * H + heads) * D
    cols64 = tl.arange(0, 64)
    m = tl.full([BH], float("-inf"), tl.float32)
    l = tl.zeros([BH], tl.float32)
    for c0 in range(0, K, 64):
        slot_ids = c0 + tl.arange(0, 64)
        slots = tl.load(idx_ptr + token * K + slot_ids, mask=slot_ids < K, other=-1)
        valid = slots >= 0
        # scores: 16-lane sums of q * kv over D
        dots = tl.zeros([BH, 64, 16], tl.float32)
        for d0 in range(0, D, 64):
            qc = tl.load(q_rows[:, None] + d0 + cols64[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
            kc = tl.load(kv_base + slots[:, None] * D + d0 + cols64[None, :], mask=valid[:, None],
                         other=0.0).to(tl.float32)
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
            for dd in range(0, D, BD):
                cols = dd + tl.arange(0, BD)
                pv = tl.zeros([BH, BD, 16], tl.float32)
                pv = _add_value_row(pv, p0, kv_base, idx_ptr + token * K, c0, K, cols, D)
                pv = _add_value_row(pv, p1, kv_base, idx_ptr + token * K, c0 + 16, K, cols, D)
                pv = _add_value_row(pv, p2, kv_base, idx_ptr + token * K, c0 + 32, K, cols, D)
                pv = _add_value_row(pv, p3, kv_base, idx_ptr + token * K, c0 + 48, K, cols, D)
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
def _fast_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, scale, S, H, N, K, D,
                 BH: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    head_ok = heads < H
    cols = tl.arange(0, BD)
    col_ok = cols < D
    kv_base = kv_ptr + (token // S) * N * D
    q = tl.load(q_ptr + (token * H + heads)[:, None] * D + cols[None, :], mask=head_ok[:, None] & col_ok[None, :],
                other=0.0)
    log2_scale = scale * 1.4426950408889634
    m = tl.full([BH], float("-inf"), tl.float32)
    l = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BD], tl.float32)
    for c0 in range(0, K, 64):
        slot_ids = c0 + tl.arange(0, 64)
        slots = tl.load(idx_ptr + token * K + slot_ids, mask=slot_ids < K, other=-1)
        valid = slots >= 0
        kv = tl.load(kv_base + slots[:, None] * D + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0)
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
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0) * 1.4426950408889634
    m_use = tl.where(m == float("-inf"), 0.0, m)
    o = acc / (l + tl.exp2(sink - m_use))[:, None]
    tl.store(out_ptr + (token * H + heads)[:, None] * D + cols[None, :], o.to(tl.bfloat16),
             mask=head_ok[:, None] & col_ok[None, :])


def _launch(kind: str, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
            scale: float) -> torch.Tensor:
    b, s, h, d = q.shape
    if kv.shape[0] != b or kv.shape[-1] != d or idx.shape[:2] != (b, s):
        raise DSV4Error(f"sparse_attention: q {tuple(q.shape)}, kv {tuple(kv.shape)} and idx {tuple(idx.shape)} "
                        "disagree on batch, length or head dim")
    tokens = b * s
    qf = q.reshape(tokens, h, d).contiguous()
    kvc = kv.contiguous()
    idxf = idx.reshape(tokens, -1).contiguous()
    k_slots = idxf.shape[1]
    out = torch.empty(tokens, h, d, dtype=torch.bfloat16, device=q.device)
    if tokens == 0:
        return out.view(b, s, h, d)
    sinkf = sink.float().contiguous()
    if kind == "exact":
        if d % 64:
            raise DSV4Error(f"the exact sparse_attention kernel needs a head dim divisible by 64, got {d}")
        acc = torch.zeros(tokens, h, d, dtype=torch.float32, device=q.device)
        _exact_kernel[(tokens, triton.cdiv(h, EXACT_HEADS))](
            qf, kvc, idxf, sinkf, acc, out, scale, s, h, kv.shape[1], k_slots, D=d, BH=EXACT_HEADS,
            BD=EXACT_BLOCK_D, enable_fp_fusion=False)
    else:
        _fast_kernel[(tokens, triton.cdiv(h, FAST_HEADS))](
            qf, kvc, idxf, sinkf, out, scale, s, h, kv.shape[1], k_slots, d, BH=FAST_HEADS,
            BD=triton.next_power_of_2(d), UPCAST=INTERPRETED, num_warps=8)
    return out.view(b, s, h, d)


def sparse_attention(kind: str):
    """The registry kernel `sparse_attention` of the given kind ('fast' or 'exact')."""
    def run(q, kv, idx, sink, scale):
        return _launch(kind, q, kv, idx, sink, scale)
    run.__name__ = f"sparse_attention_{kind}"
    return run


def hca_attention(kind: str):
    """The registry kernel `hca_attention` of the given kind: the sparse kernel over the HCA index list."""
    def run(q, kv, window_idx, comp_offset, n_comp, sink, scale):
        width = kv.shape[1] - comp_offset      # every compressed row kv holds: no host sync, same result
        return _launch(kind, q, kv, hca_indices(window_idx, comp_offset, n_comp, width), sink, scale)
    run.__name__ = f"hca_attention_{kind}"
    return run
