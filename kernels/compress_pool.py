"""compress_pool as one Triton kernel, shared by the CUDA and npu (Triton-Ascend) backends: per channel, the softmax
of the scores over the R rows and the weighted sum of kv, one program per (compressed entry, block of channels).

A program holds all R rows of its channels, so the reduction over R never leaves it: its order depends on R and the
tile shape only, never on how many entries the call carries (batch-invariant by construction). Tiles hold at most
TILE fp32 values per operand, well inside the 192 KiB unified buffer of a 910B vector core with double buffering.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096


@triton.jit
def _compress_pool_kernel(kv_ptr, score_ptr, out_ptr, R, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    entry = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offsets = entry * R * C + rows[:, None] * C + cols[None, :]
    score = tl.load(score_ptr + offsets, mask=mask, other=float("-inf"))
    kv = tl.load(kv_ptr + offsets, mask=mask, other=0.0)
    weight = tl.exp(score - tl.max(score, axis=0)[None, :])        # rows scored -inf weigh 0
    pooled = tl.sum(weight * kv, axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + entry * C + cols, pooled, mask=cols < C)


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """kv, score [n, R, c] fp32 -> [n, c] fp32 (the `compress_pool` contract)."""
    n, r, c = kv.shape
    rows = triton.next_power_of_2(r)
    block_c = max(1, min(triton.next_power_of_2(c), TILE // rows))
    out = torch.empty(n, c, dtype=torch.float32, device=kv.device)
    _compress_pool_kernel[(n, triton.cdiv(c, block_c))](kv.float().contiguous(), score.float().contiguous(), out,
                                                         r, c, ROWS=rows, BLOCK_C=block_c)
    return out
