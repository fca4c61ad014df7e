"""The float `linear` op in Triton, in the contract's canonical order: y[m, n] = the 16-lane sum over K of the fp32
products x[m, k] * w[n, k] (used for the bf16/fp32 weights: wo_a's grouped projection, the compressor and gate
projections, the output head).

x [M, G, K] and w [G, N, K] (G = 1 for a plain linear; grouped: y[:, g] = x[:, g] @ w[g].T). One program per
(BLOCK_M rows, BLOCK_N outputs, group) keeps [BLOCK_M, BLOCK_N, 16] lane accumulators; each step it issues K_STEPS
independent 16-column loads straight into lane tiles and adds them in order. A lane is a chain of K/16 dependent
additions, so at decode (a few rows) a program's speed is the latency of its loads: small calls take narrow tiles
(more programs) and more loads in flight per step.
Each output has its own accumulation in a fixed order, so the tile shape never changes a bit: one kernel serves every
level. (The `fast` level on CUDA uses cuBLAS instead; see cuda/__init__.py.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.backends.canonical.ops import route
from dsv4.kernels import exact_math as em
from dsv4.kernels.occupancy import target_programs

ACCUMULATORS = 8192     # BLOCK_M * BLOCK_N * 16 fp32 values per program, at most
LOADED = 8192           # K_STEPS * BLOCK_N * 16 weight values in flight per program, at most
MAX_K_STEPS = 64


@triton.jit
def _linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, G, OUT_BF16: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_STEPS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # 64-bit offsets
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(2)
    row_ok, col_ok = rows < M, cols < N
    lanes = tl.arange(0, 16)
    x_rows = x_ptr + (rows * G + g) * K
    w_rows = w_ptr + (g * N + cols) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N, 16], tl.float32)
    for k_first in range(0, K, 16 * K_STEPS):
        for step in tl.static_range(K_STEPS):
            k = k_first + step * 16 + lanes
            k_ok = (k < K)[None, :]
            x = tl.load(x_rows[:, None] + k[None, :], mask=row_ok[:, None] & k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows[:, None] + k[None, :], mask=col_ok[:, None] & k_ok, other=0.0).to(tl.float32)
            acc = acc + x[:, None, :] * w[None, :, :]
    y = em.lane_tree(acc)
    out = y_ptr + (rows[:, None] * G + g) * N + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    em.store(out, y, mask, OUT_BF16)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The `linear` contract: x [..., K] @ weight[N, K].T, or grouped x [..., G, K] with weight [G, N, K]."""
    grouped = weight.dim() == 3
    g = weight.shape[0] if grouped else 1
    n, k = weight.shape[-2:]
    lead = x.shape[:-2] if grouped else x.shape[:-1]
    xs = x.reshape(-1, g, k).contiguous()
    m = xs.shape[0]
    y = torch.empty(m, g, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = min(16, triton.next_power_of_2(m))
        block_n = ACCUMULATORS // (16 * block_m)
        target = target_programs(x.device)
        while block_n > 2 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * g < target:
            block_n //= 2                                   # small calls: more, narrower programs
        k_steps = max(1, min(MAX_K_STEPS, LOADED // (16 * block_n), triton.cdiv(k, 16)))
        _linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), g)](
            xs, weight.contiguous(), y, m, n, k, g, OUT_BF16=x.dtype == torch.bfloat16, BLOCK_M=block_m,
            BLOCK_N=block_n, K_STEPS=k_steps, num_warps=1 if block_m * block_n <= 16 else 4, enable_fp_fusion=False)
    return y.view(*lead, g, n) if grouped else y.view(*lead, n)


def cublas_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The `linear` contract through cuBLAS (fp32 accumulation, order of cuBLAS's choosing): the fast level. An fp32
    input with a bf16 weight (the head, the compressor projections) multiplies in bf16 with an fp32 output: the
    inputs the model passes there are bf16 values, and the weight is read once, not widened per call."""
    if weight.dim() == 3:
        return torch.einsum("...gk,gnk->...gn", x, weight.to(x.dtype))
    if x.dtype == torch.float32 and weight.dtype == torch.bfloat16:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        return torch.mm(rows, weight.T, out_dtype=torch.float32).view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight.to(x.dtype))


@triton.jit
def _affinity_kernel(logits_ptr, a_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    z = tl.load(logits_ptr + i, mask=i < n, other=0.0)
    tl.store(a_ptr + i, tl.sqrt_rn(em.softplus(z)), mask=i < n)


def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hash_experts: torch.Tensor | None,
             k: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The `moe_gate` contract: the gate logits through the linear kernel, the affinities sqrt(softplus(logits)) in
    one kernel, then the reference's routing on the small [T, E] affinities (top-k and normalisation)."""
    logits = linear(x.float(), weight)
    a = torch.empty_like(logits)
    if logits.numel():
        block = 1024
        _affinity_kernel[(triton.cdiv(logits.numel(), block),)](logits, a, logits.numel(), BLOCK=block,
                                                                enable_fp_fusion=False)
    return route(a, bias, hash_experts, k, route_scale)
