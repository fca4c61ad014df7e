"""compress_pool as one Triton kernel, shared by the CUDA and npu (Triton-Ascend) backends, in the contract's
canonical order (so one kernel serves every level): per channel, the softmax of the scores over the R rows and the
weighted sum of kv. One program per (compressed entry, block of channels).

The sums over R are 16-lane sums: row r goes to lane r % 16, rows in increasing order, then the lane tree; exp is
the canonical polynomial and the final division is correctly rounded. Tiles hold BLOCK_C x 16 fp32 accumulators,
well inside the 192 KiB unified buffer of a 910B vector core.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels import exact_math as em

BLOCK_C = 128


@triton.jit
def _compress_pool_kernel(kv_ptr, score_ptr, out_ptr, R, C, BLOCK_C: tl.constexpr):
    entry = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    base = entry * R * C + cols
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for r in range(R):
        m = tl.maximum(m, tl.load(score_ptr + base + r * C, mask=col_ok, other=0.0))
    num = tl.zeros([BLOCK_C, 16], tl.float32)
    den = tl.zeros([BLOCK_C, 16], tl.float32)
    for r in range(R):
        e = em.exp(tl.load(score_ptr + base + r * C, mask=col_ok, other=0.0) - m)     # rows scored -inf weigh 0
        kv = tl.load(kv_ptr + base + r * C, mask=col_ok, other=0.0)
        den = em.add_to_lane(den, e, r)
        num = em.add_to_lane(num, e * kv, r)
    pooled = em.div(tl.reshape(em.lane_tree(tl.reshape(num, (BLOCK_C, 1, 16))), (BLOCK_C,)),
                    tl.reshape(em.lane_tree(tl.reshape(den, (BLOCK_C, 1, 16))), (BLOCK_C,)))
    tl.store(out_ptr + entry * C + cols, pooled, mask=col_ok)


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """kv, score [n, R, c] fp32 -> [n, c] fp32 (the `compress_pool` contract)."""
    n, r, c = kv.shape
    out = torch.empty(n, c, dtype=torch.float32, device=kv.device)
    if n:
        _compress_pool_kernel[(n, triton.cdiv(c, BLOCK_C))](kv.float().contiguous(), score.float().contiguous(), out,
                                                             r, c, BLOCK_C=BLOCK_C, enable_fp_fusion=False)
    return out
