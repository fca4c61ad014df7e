"""mhc_pre as one Triton kernel (CUDA and Triton-Ascend), one program per token, in the contract's canonical order
(so one kernel serves every level): the mixes (flat(x) @ fn.T over K = hc*d, scaled by the token's rsqrt(mean
square)), the pre and post gates, the Sinkhorn normalisation of the hc x hc comb, and the collapse y = sum_j pre_j x_j.

Every reduction is a 16-lane sum (kernels/exact_math.py): the mixes and the mean square load 64 columns of x and of
the three fn tiles (pre, post, comb rows) per step; the row and column sums of the hc x hc comb put the hc values in
the first lanes of 16. sigmoid and exp are the canonical polynomials, divisions and the square root are correctly
rounded, and FMA contraction is off. hc must be a power of two (DeepSeek-V4: 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

BLOCK_D = 512


@triton.jit
def _small_lane_sum(v):
    """[R, C] with C <= 16 values per row -> [R]: their lane sum (value c in lane c, lanes from +0.0, lane tree)."""
    R: tl.constexpr = v.shape[0]
    C: tl.constexpr = v.shape[1]
    c = tl.arange(0, C)
    lanes = tl.arange(0, 16)
    padded = tl.sum(tl.where(c[None, :, None] == lanes[None, None, :], v[:, :, None], 0.0), axis=1)   # one term each
    return tl.reshape(em.lane_tree(tl.reshape(tl.zeros_like(padded) + padded, (R, 1, 16))), (R,))


@triton.jit
def _entry(v, i):
    """v[i] of a small vector, as a scalar (a sum of one term and zeros)."""
    return tl.sum(tl.where(tl.arange(0, v.shape[0]) == i, v, 0.0), axis=0)


@triton.jit
def _mhc_pre_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, D, norm_eps, hc_eps, iters,
                    HC: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    K = HC * D
    j = tl.arange(0, HC)
    jj = tl.arange(0, HC * HC)
    x_row = x_ptr + token * K
    acc_pre = tl.zeros([HC, 1, 16], tl.float32)
    acc_post = tl.zeros([HC, 1, 16], tl.float32)
    acc_comb = tl.zeros([HC * HC, 1, 16], tl.float32)
    squares = tl.zeros([1, 1, 16], tl.float32)
    for k0 in range(0, K, 64):
        k = k0 + tl.arange(0, 64)
        in_k = k < K
        xk = tl.load(x_row + k, mask=in_k, other=0.0).to(tl.float32)[None, :]
        squares = em.add_products64(squares, xk, xk)
        f_pre = tl.load(fn_ptr + j[:, None] * K + k[None, :], mask=in_k[None, :], other=0.0)
        f_post = tl.load(fn_ptr + (HC + j)[:, None] * K + k[None, :], mask=in_k[None, :], other=0.0)
        f_comb = tl.load(fn_ptr + (2 * HC + jj)[:, None] * K + k[None, :], mask=in_k[None, :], other=0.0)
        acc_pre = em.add_products64(acc_pre, f_pre, xk)
        acc_post = em.add_products64(acc_post, f_post, xk)
        acc_comb = em.add_products64(acc_comb, f_comb, xk)
    mean_square = em.div(tl.reshape(em.lane_tree(squares), (1,)), tl.full((1,), K, tl.float32))
    inv_rms = em.div(tl.full((1,), 1.0, tl.float32), tl.sqrt_rn(mean_square + norm_eps))
    mix_pre = tl.reshape(em.lane_tree(acc_pre), (HC,)) * inv_rms
    mix_post = tl.reshape(em.lane_tree(acc_post), (HC,)) * inv_rms
    mix_comb = tl.reshape(em.lane_tree(acc_comb), (HC * HC,)) * inv_rms
    pre = em.sigmoid(mix_pre * tl.load(scale_ptr) + tl.load(base_ptr + j)) + hc_eps
    post = em.sigmoid(mix_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + j)) * 2.0
    comb = tl.reshape(mix_comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + jj), (HC, HC))
    comb = em.exp(comb - tl.max(comb, axis=1)[:, None])
    comb = em.div(comb, tl.broadcast_to(_small_lane_sum(comb)[:, None], comb.shape)) + hc_eps
    comb = em.div(comb, tl.broadcast_to(_small_lane_sum(tl.trans(comb))[None, :] + hc_eps, comb.shape))
    for _ in range(iters - 1):
        comb = em.div(comb, tl.broadcast_to(_small_lane_sum(comb)[:, None] + hc_eps, comb.shape))
        comb = em.div(comb, tl.broadcast_to(_small_lane_sum(tl.trans(comb))[None, :] + hc_eps, comb.shape))
    tl.store(post_ptr + token * HC + j, post)
    tl.store(comb_ptr + token * HC * HC + j[:, None] * HC + j[None, :], comb)
    for d0 in range(0, D, BLOCK_D):          # y = sum_j pre_j x_j, from the j = 0 term, in increasing j
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        y = _entry(pre, 0) * tl.load(x_row + d, mask=in_d, other=0.0).to(tl.float32)
        for s in tl.static_range(1, HC):
            y = y + _entry(pre, s) * tl.load(x_row + s * D + d, mask=in_d, other=0.0).to(tl.float32)
        tl.store(y_ptr + token * D + d, em.to_bf16(y), mask=in_d)


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
            hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `mhc_pre` contract: x [b, s, hc, d] bf16 -> (y [b, s, d] bf16, post [b, s, hc], comb [b, s, hc, hc])."""
    *lead, hc, d = x.shape
    if hc & (hc - 1) or hc > 16:
        raise DSV4Error(f"the Triton mhc_pre kernel needs a power-of-two number of streams up to 16, got {hc}")
    tokens = x.reshape(-1, hc, d).contiguous()
    n = tokens.shape[0]
    y = torch.empty(n, d, dtype=torch.bfloat16, device=x.device)
    post = torch.empty(n, hc, dtype=torch.float32, device=x.device)
    comb = torch.empty(n, hc, hc, dtype=torch.float32, device=x.device)
    if n:
        _mhc_pre_kernel[(n,)](tokens, fn.float().contiguous(), scale.float().contiguous(), base.float().contiguous(),
                              y, post, comb, d, norm_eps, hc_eps, iters, HC=hc,
                              BLOCK_D=min(BLOCK_D, triton.next_power_of_2(d)), enable_fp_fusion=False)
    return y.reshape(*lead, d), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)
