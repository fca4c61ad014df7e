"""mhc_pre as one Triton kernel (CUDA and Triton-Ascend), one program per token: the mixes (flat(x) @ fn.T over
K = hc*d, scaled by the token's rsqrt(mean square)), the pre and post gates, the Sinkhorn normalisation of the
hc x hc comb, and the collapse y = sum_j pre_j x_j.

Everything a token needs stays in its program, so its bits do not depend on the other tokens of the call
(batch-invariant by construction). The fn rows are read in three tiles (pre, post, comb) of BLOCK_K columns; the
comb accumulator is hc*hc long and reshaped to hc x hc for the row and column sums. hc must be a power of two
(DeepSeek-V4: 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.errors import DSV4Error

BLOCK_K = 256
BLOCK_D = 512


@triton.jit
def _mhc_pre_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, D, norm_eps, hc_eps, iters,
                    HC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    K = HC * D
    j = tl.arange(0, HC)
    jj = tl.arange(0, HC * HC)
    x_row = x_ptr + token * K
    acc_pre = tl.zeros([HC], dtype=tl.float32)
    acc_post = tl.zeros([HC], dtype=tl.float32)
    acc_comb = tl.zeros([HC * HC], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < K
        xk = tl.load(x_row + k, mask=in_k, other=0.0).to(tl.float32)
        squares += xk * xk
        f_pre = tl.load(fn_ptr + j[:, None] * K + k[None, :], mask=in_k[None, :], other=0.0)
        f_post = tl.load(fn_ptr + (HC + j)[:, None] * K + k[None, :], mask=in_k[None, :], other=0.0)
        f_comb = tl.load(fn_ptr + (2 * HC + jj)[:, None] * K + k[None, :], mask=in_k[None, :], other=0.0)
        acc_pre += tl.sum(f_pre * xk[None, :], axis=1)
        acc_post += tl.sum(f_post * xk[None, :], axis=1)
        acc_comb += tl.sum(f_comb * xk[None, :], axis=1)
    inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + norm_eps)
    pre = tl.sigmoid(acc_pre * inv_rms * tl.load(scale_ptr) + tl.load(base_ptr + j)) + hc_eps
    post = tl.sigmoid(acc_post * inv_rms * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + j)) * 2.0
    logits = acc_comb * inv_rms * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + jj)
    comb = tl.reshape(logits, (HC, HC))
    comb = tl.exp(comb - tl.max(comb, axis=1)[:, None])
    comb = comb / tl.sum(comb, axis=1)[:, None] + hc_eps
    comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=1)[:, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
    tl.store(post_ptr + token * HC + j, post)
    tl.store(comb_ptr + token * HC * HC + j[:, None] * HC + j[None, :], comb)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        streams = tl.load(x_row + j[:, None] * D + d[None, :], mask=in_d[None, :], other=0.0).to(tl.float32)
        y = tl.sum(pre[:, None] * streams, axis=0)
        tl.store(y_ptr + token * D + d, y.to(tl.bfloat16), mask=in_d)


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
            hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `mhc_pre` contract: x [b, s, hc, d] bf16 -> (y [b, s, d] bf16, post [b, s, hc], comb [b, s, hc, hc])."""
    *lead, hc, d = x.shape
    if hc & (hc - 1):
        raise DSV4Error(f"the Triton mhc_pre kernel needs a power-of-two number of streams, got {hc}")
    tokens = x.reshape(-1, hc, d).contiguous()
    n = tokens.shape[0]
    y = torch.empty(n, d, dtype=torch.bfloat16, device=x.device)
    post = torch.empty(n, hc, dtype=torch.float32, device=x.device)
    comb = torch.empty(n, hc, hc, dtype=torch.float32, device=x.device)
    _mhc_pre_kernel[(n,)](tokens, fn.float().contiguous(), scale.float().contiguous(), base.float().contiguous(),
                          y, post, comb, d, norm_eps, hc_eps, iters, HC=hc, BLOCK_K=BLOCK_K,
                          BLOCK_D=min(BLOCK_D, triton.next_power_of_2(d)))
    return y.reshape(*lead, d), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)
