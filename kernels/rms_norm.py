"""RMSNorm in Triton, in the contract's canonical order (so one kernel serves every level).

x [R, n] -> weight * (x * 1/sqrt(s/n + eps)), s the 16-lane sum of x^2. One program per BLOCK_R rows: a first pass
forms the lane sums (K_STEPS independent 16-column loads straight into lane tiles per step, added in order: the
lanes are a chain of dependent additions, so overlapping the loads is what makes it fast), a second scales the row
BLOCK_N columns at a time. Few rows (decode) take one row per program. Division and square root are correctly rounded; no FMA contraction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels import exact_math as em

BLOCK_R = 16        # rows per program when there are many (prefill); one otherwise
BLOCK_N = 1024
K_STEPS = 32


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, R, n, eps, HAS_WEIGHT: tl.constexpr, OUT_BF16: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, K_STEPS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # 64-bit offsets
    row_ok = rows < R
    lanes = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_R, 16], tl.float32)
    for k0 in range(0, n, 16 * K_STEPS):
        for step in tl.static_range(K_STEPS):
            c = k0 + step * 16 + lanes
            x = tl.load(x_ptr + rows[:, None] * n + c[None, :], mask=row_ok[:, None] & (c < n)[None, :],
                        other=0.0).to(tl.float32)
            acc = acc + x * x
    s = em.lane_total(acc)
    mean = em.div(s, tl.full(s.shape, n, tl.float32))
    inv = em.div(tl.full(s.shape, 1.0, tl.float32), tl.sqrt_rn(mean + eps))
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < n)[None, :]
        y = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv[:, None]
        if HAS_WEIGHT:
            y = tl.load(w_ptr + cols, mask=cols < n, other=0.0)[None, :] * y
        em.store(y_ptr + rows[:, None] * n + cols[None, :], y, mask, OUT_BF16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The `rms_norm` contract: x [..., n] bf16 or fp32, weight [n] fp32 or None."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()
    y = torch.empty_like(rows)
    if rows.shape[0]:
        w = weight.float().contiguous() if weight is not None else rows   # any pointer when there is no weight
        block_r = BLOCK_R if rows.shape[0] >= 4 * BLOCK_R else 1
        _rms_norm_kernel[(triton.cdiv(rows.shape[0], block_r),)](
            rows, w, y, rows.shape[0], n, eps, HAS_WEIGHT=weight is not None, OUT_BF16=x.dtype == torch.bfloat16,
            BLOCK_R=block_r, BLOCK_N=min(BLOCK_N, triton.next_power_of_2(n)), K_STEPS=K_STEPS,
            num_warps=4 if block_r > 1 else 2, enable_fp_fusion=False)
    return y.view(x.shape)
