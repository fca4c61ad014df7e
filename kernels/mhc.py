"""The mHC stream mappings in Triton (CUDA and Triton-Ascend), in the contract's canonical order (so one kernel
serves every level): `mhc_pre` (mixes, pre/post gates, Sinkhorn of the hc x hc comb, collapse y = sum_j pre_j x_j)
and `mhc_head` (mixes, pre gate, collapse).

Two kernels each. The mixes, flat(x) @ fn.T over K = hc*d and the mean square of flat(x), are 16-lane sums over K
(kernels/exact_math.py): a chain of K/16 dependent additions per lane, so their speed is the memory latency of the
chain's loads. One program per (token, row of fn) shares them out, and each step of a program issues K_STEPS
independent 16-column loads straight into lane tiles before adding them in order, so the loads overlap. A second
kernel, one
program per token, finishes: rsqrt of the mean square, gates (canonical sigmoid), the Sinkhorn rounds (row and
column sums put the hc values in the first lanes of 16), the collapse. Divisions and the square root are correctly
rounded; FMA contraction is off. hc must be a power of two (DeepSeek-V4: 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.errors import DSV4Error
from dsv4.kernels import exact_math as em

ROW_BLOCK = 1      # rows of fn per mixes program
K_STEPS = 64       # 16-column loads a mixes program has in flight per step


@triton.jit
def _mixes_kernel(x_ptr, fn_ptr, out_ptr, K, ROWS, RB: tl.constexpr, K_STEPS: tl.constexpr):
    """out[token, r] = lanesum_K(fn[r] * x) for r < ROWS, and out[token, ROWS] = lanesum_K(x * x)."""
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    rows = tl.program_id(1) * RB + tl.arange(0, RB)
    first = tl.program_id(1) * RB
    squares = first >= ROWS                        # the program past the fn rows forms the mean square's sum
    row_ok = rows < tl.where(squares, 0, ROWS)     # the fn rows this program reads (none for the squares)
    x_row = x_ptr + token * K
    lanes = tl.arange(0, 16)
    acc = tl.zeros([RB, 16], tl.float32)
    for k0 in range(0, K, 16 * K_STEPS):
        for step in tl.static_range(K_STEPS):
            k = k0 + step * 16 + lanes
            in_k = k < K
            xk = tl.load(x_row + k, mask=in_k, other=0.0).to(tl.float32)[None, :]
            f = tl.load(fn_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & in_k[None, :], other=0.0)
            acc = acc + tl.where(squares, tl.broadcast_to(xk, (RB, 16)), f) * xk
    sums = em.lane_total(acc)
    out_rows = tl.where(squares, ROWS, rows)
    tl.store(out_ptr + token * (ROWS + 1) + out_rows, sums, mask=out_rows < tl.where(squares, ROWS + 1, ROWS))


def _mixes(x: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """x [n, hc, d] bf16, fn [R, hc*d] fp32 -> [n, R + 1]: the R lane-summed mixes, then the sum of squares."""
    n, k = x.shape[0], x.shape[1] * x.shape[2]
    rows = fn.shape[0]
    out = torch.empty(n, rows + 1, dtype=torch.float32, device=x.device)
    _mixes_kernel[(n, triton.cdiv(rows, ROW_BLOCK) + 1)](x, fn.float().contiguous(), out, k, rows, RB=ROW_BLOCK,
                                                         K_STEPS=K_STEPS, num_warps=1, enable_fp_fusion=False)
    return out


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
def _inv_rms(mix_row, ROWS, K, norm_eps):
    """1 / sqrt(mean(flat(x)^2) + eps) of one token from its sum of squares (mixes column ROWS)."""
    mean_square = em.div(tl.load(mix_row + ROWS + tl.arange(0, 1)), tl.full((1,), K, tl.float32))
    return em.div(tl.full((1,), 1.0, tl.float32), tl.sqrt_rn(mean_square + norm_eps))


@triton.jit
def _collapse(x_row, y_row, pre, D, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = sum_j pre_j x_j, from the j = 0 term, in increasing j, one cast to bf16."""
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        y = _entry(pre, 0) * tl.load(x_row + d, mask=in_d, other=0.0).to(tl.float32)
        for s in tl.static_range(1, HC):
            y = y + _entry(pre, s) * tl.load(x_row + s * D + d, mask=in_d, other=0.0).to(tl.float32)
        tl.store(y_row + d, em.to_bf16(y), mask=in_d)


@triton.jit
def _pre_finish_kernel(x_ptr, mix_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, D, norm_eps, hc_eps, iters,
                       HC: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    ROWS: tl.constexpr = (2 + HC) * HC
    j = tl.arange(0, HC)
    jj = tl.arange(0, HC * HC)
    mix_row = mix_ptr + token * (ROWS + 1)
    inv_rms = _inv_rms(mix_row, ROWS, HC * D, norm_eps)
    mix_pre = tl.load(mix_row + j) * inv_rms
    mix_post = tl.load(mix_row + HC + j) * inv_rms
    mix_comb = tl.load(mix_row + 2 * HC + jj) * inv_rms
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
    _collapse(x_ptr + token * HC * D, y_ptr + token * D, pre, D, HC, BLOCK_D)


@triton.jit
def _head_finish_kernel(x_ptr, mix_ptr, scale_ptr, base_ptr, y_ptr, D, norm_eps, hc_eps, HC: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HC)
    mix_row = mix_ptr + token * (HC + 1)
    mix = tl.load(mix_row + j) * _inv_rms(mix_row, HC, HC * D, norm_eps)
    pre = em.sigmoid(mix * tl.load(scale_ptr) + tl.load(base_ptr + j)) + hc_eps
    _collapse(x_ptr + token * HC * D, y_ptr + token * D, pre, D, HC, BLOCK_D)


def _streams(x: torch.Tensor) -> torch.Tensor:
    *_, hc, d = x.shape
    if hc & (hc - 1) or hc > 16:
        raise DSV4Error(f"the Triton mHC kernels need a power-of-two number of streams up to 16, got {hc}")
    return x.reshape(-1, hc, d).contiguous()


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
            hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `mhc_pre` contract: x [b, s, hc, d] bf16 -> (y [b, s, d] bf16, post [b, s, hc], comb [b, s, hc, hc])."""
    *lead, hc, d = x.shape
    tokens = _streams(x)
    n = tokens.shape[0]
    y = torch.empty(n, d, dtype=torch.bfloat16, device=x.device)
    post = torch.empty(n, hc, dtype=torch.float32, device=x.device)
    comb = torch.empty(n, hc, hc, dtype=torch.float32, device=x.device)
    if n:
        _pre_finish_kernel[(n,)](tokens, _mixes(tokens, fn), scale.float().contiguous(), base.float().contiguous(),
                                 y, post, comb, d, norm_eps, hc_eps, iters, HC=hc,
                                 BLOCK_D=triton.next_power_of_2(d), enable_fp_fusion=False)
    return y.reshape(*lead, d), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)


def mhc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
             hc_eps: float) -> torch.Tensor:
    """The `mhc_head` contract: x [b, s, hc, d] bf16 -> y [b, s, d] bf16."""
    *lead, hc, d = x.shape
    tokens = _streams(x)
    n = tokens.shape[0]
    y = torch.empty(n, d, dtype=torch.bfloat16, device=x.device)
    if n:
        _head_finish_kernel[(n,)](tokens, _mixes(tokens, fn), scale.float().contiguous(), base.float().contiguous(),
                                  y, d, norm_eps, hc_eps, HC=hc, BLOCK_D=triton.next_power_of_2(d),
                                  enable_fp_fusion=False)
    return y.reshape(*lead, d)
