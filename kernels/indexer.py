"""The lightning indexer's scores in Triton, in the contract's canonical order; the top-k selection is shared with the
reference (`canonical.ops.select_topk`, integer work only).

S[token, t] = sum_h relu(<q_h, keys_t>) * w_h, q [T, H, d] (T = b*s tokens), keys [b, N, d], w [T, H]. One program
per (token, block of BLOCK_T keys): for each head, the dot products are 16-lane sums over d (64 columns loaded
per step); relu(dot) * w_h goes to
lane h % 16 of the head accumulator, which the lane tree finally reduces.

Why only an exact kernel: the op's output is a set of indices, which every level must reproduce exactly
(contracts: exact_only_output). A tensor-core score rounds differently, and near-ties at the top-k boundary would
then select other entries, so the one kernel serves every level.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.backends.canonical.ops import select_topk
from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

BLOCK_T = 32


@triton.jit
def _scores_kernel(q_ptr, w_ptr, keys_ptr, out_ptr, S, H, N, D: tl.constexpr, BLOCK_T: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    cols64 = tl.arange(0, 64)
    key_rows = keys_ptr + (token // S) * N * D + t * D
    heads = tl.zeros([BLOCK_T, 16], tl.float32)
    for h in range(H):
        dots = tl.zeros([1, BLOCK_T, 16], tl.float32)
        for d0 in range(0, D, 64):
            k = tl.load(key_rows[:, None] + d0 + cols64[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
            q = tl.load(q_ptr + (token * H + h) * D + d0 + cols64).to(tl.float32)
            dots = em.add_products64(dots, q[None, :], k)
        dot = tl.reshape(em.lane_tree(dots), (BLOCK_T,))
        term = tl.maximum(dot, 0.0) * tl.load(w_ptr + token * H + h)
        heads = em.add_to_lane(heads, term, h)
    score = tl.reshape(em.lane_tree(tl.reshape(heads, (BLOCK_T, 1, 16))), (BLOCK_T,))
    tl.store(out_ptr + token * N + t, score, mask=t_ok)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [b, s, H, d] bf16, weights [b, s, H] fp32, keys [b, N, d] bf16 -> S [b, s, N] fp32."""
    b, s, h, d = q.shape
    n = keys.shape[1]
    if keys.shape[0] != b or keys.shape[-1] != d:
        raise DSV4Error(f"indexer_topk: q {tuple(q.shape)} and keys {tuple(keys.shape)} disagree on batch or dim")
    if d % 64:
        raise DSV4Error(f"the indexer kernel needs a head dim divisible by 64, got {d}")
    out = torch.empty(b, s, n, dtype=torch.float32, device=q.device)
    if b * s and n:
        _scores_kernel[(b * s, triton.cdiv(n, BLOCK_T))](
            q.contiguous(), weights.float().contiguous(), keys.contiguous(), out, s, h, n, D=d, BLOCK_T=BLOCK_T,
            enable_fp_fusion=False)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
                 k: int) -> torch.Tensor:
    """The registry kernel `indexer_topk`: exact scores, then the reference's selection."""
    return select_topk(indexer_scores(q, weights, keys), n_visible, k)
