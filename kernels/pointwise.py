"""The model's elementwise ops in Triton, each in its contract's canonical order (one kernel serves every level):
RoPE, clamped SwiGLU, the mHC post-mapping and the MoE combine. None of them reduces over more than a handful of
terms, and each term is added in the contract's order, so the bits are the CPU reference's; what the kernels save
is the many small torch launches (and temporaries) of the composite.

Every kernel takes rows of a flat [R, width] view and writes bf16 through `exact_math.to_bf16` (or fp32 as given).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels import exact_math as em

BLOCK = 1024        # elements of a row handled per program step


# -- rope ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, D, R, ROWS_PER_ANGLE, INVERSE: tl.constexpr,
                 OUT_BF16: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)            # 64-bit offsets: tensors may exceed 2^31 elements
    angle = row // ROWS_PER_ANGLE
    x_row, y_row = x_ptr + row * D, y_ptr + row * D
    first = D - 2 * HALF
    i = tl.arange(0, HALF)
    a = tl.load(x_row + first + 2 * i).to(tl.float32)
    b = tl.load(x_row + first + 2 * i + 1).to(tl.float32)
    c = tl.load(cos_ptr + angle * HALF + i)
    s = tl.load(sin_ptr + angle * HALF + i)
    if INVERSE:
        a2, b2 = a * c + b * s, b * c - a * s
    else:
        a2, b2 = a * c - b * s, a * s + b * c
    em.store(y_row + first + 2 * i, a2, i < HALF, OUT_BF16)
    em.store(y_row + first + 2 * i + 1, b2, i < HALF, OUT_BF16)
    for p0 in range(0, first, PASS):           # the dims before the rotated ones pass through
        j = p0 + tl.arange(0, PASS)
        tl.store(y_row + j, tl.load(x_row + j, mask=j < first), mask=j < first)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The `rope` contract. cos/sin [..., r] match x's leading dims, or those of x without its head dim."""
    d, half = x.shape[-1], cos.shape[-1]
    lead, angle_lead = x.shape[:-1], cos.shape[:-1]
    if angle_lead == lead:
        per_angle = 1
    elif len(lead) >= 2 and angle_lead == lead[:-1] + (1,):
        per_angle = lead[-1]
    else:
        cos, sin, per_angle = cos.expand(*lead, half), sin.expand(*lead, half), 1
    if half & (half - 1):
        raise ValueError(f"the rope kernel needs a power-of-two rotated half width, got {half}")
    rows = x.reshape(-1, d).contiguous()
    y = torch.empty_like(rows)
    if rows.shape[0]:
        _rope_kernel[(rows.shape[0],)](
            rows, cos.float().reshape(-1, half).contiguous(), sin.float().reshape(-1, half).contiguous(), y, d,
            rows.shape[0], per_angle, INVERSE=inverse, OUT_BF16=x.dtype == torch.bfloat16, HALF=half,
            PASS=min(BLOCK, triton.next_power_of_2(max(d - 2 * half, 1))), enable_fp_fusion=False)
    return y.view(x.shape)


# -- swiglu --------------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, w_ptr, y_ptr, F, limit, CLAMP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)            # 64-bit offsets: tensors may exceed 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(g_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    h = em.silu(g) * u
    if HAS_WEIGHT:
        h = h * tl.load(w_ptr + row)
    tl.store(y_ptr + row * F + cols, em.to_bf16(h), mask=mask)


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, route_weight: torch.Tensor | None) -> torch.Tensor:
    """The `swiglu` contract: silu(min(g, limit)) * clamp(u, -limit, limit) * route_weight, bf16."""
    n, f = g.shape
    y = torch.empty(n, f, dtype=torch.bfloat16, device=g.device)
    if n:
        w = route_weight.float().contiguous() if route_weight is not None else y
        _swiglu_kernel[(n, triton.cdiv(f, BLOCK))](
            g.contiguous(), u.contiguous(), w, y, f, limit, CLAMP=limit > 0, HAS_WEIGHT=route_weight is not None,
            BLOCK=min(BLOCK, triton.next_power_of_2(f)), enable_fp_fusion=False)
    return y


# -- mhc_post ------------------------------------------------------------------------------------------------------
@triton.jit
def _mhc_post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, y_ptr, D, HC: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    f = tl.load(f_ptr + token * D + cols, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(HC):
        out = tl.load(post_ptr + token * HC + k) * f
        for j in tl.static_range(HC):
            x = tl.load(x_ptr + (token * HC + j) * D + cols, mask=mask, other=0.0).to(tl.float32)
            out = out + tl.load(comb_ptr + (token * HC + j) * HC + k) * x
        tl.store(y_ptr + (token * HC + k) * D + cols, em.to_bf16(out), mask=mask)


def mhc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The `mhc_post` contract: out_k = post_k * f + sum_j comb[j, k] * x_j (j increasing), bf16."""
    *lead, hc, d = x.shape
    tokens = f.reshape(-1, d).shape[0]
    y = torch.empty(*lead, hc, d, dtype=torch.bfloat16, device=x.device)
    if tokens:
        _mhc_post_kernel[(tokens, triton.cdiv(d, BLOCK))](
            f.contiguous(), x.contiguous(), post.float().contiguous(), comb.float().contiguous(), y, d, HC=hc,
            BLOCK=min(BLOCK, triton.next_power_of_2(d)), enable_fp_fusion=False)
    return y


# -- moe_combine ---------------------------------------------------------------------------------------------------
@triton.jit
def _moe_combine_kernel(out_ptr, position_ptr, shared_ptr, y_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # 64-bit offsets: tensors may exceed 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    row = tl.load(position_ptr + token * K)
    y = tl.load(out_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    for slot in tl.static_range(1, K):
        row = tl.load(position_ptr + token * K + slot)
        y = y + tl.load(out_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = y + tl.load(shared_ptr + token * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + token * D + cols, em.to_bf16(y), mask=mask)


def moe_combine(expert_out: torch.Tensor, order: torch.Tensor, k: int, shared: torch.Tensor) -> torch.Tensor:
    """The `moe_combine` contract: y_t = sum of token t's k slot outputs in slot order, then + shared_t; bf16."""
    t, d = shared.shape
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    y = torch.empty(t, d, dtype=torch.bfloat16, device=shared.device)
    if t:
        _moe_combine_kernel[(t, triton.cdiv(d, BLOCK))](
            expert_out.contiguous(), position, shared.contiguous(), y, d, K=k,
            BLOCK=min(BLOCK, triton.next_power_of_2(d)), enable_fp_fusion=False)
    return y
