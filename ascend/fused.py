"""fast-level kernels on torch-npu's fused operators and the NPU's matmul.

Each wrapper is split in two: a pure function that turns our tensors into the operands and layout the operator
documents (tested on CPU against documented-semantics doubles of the operators), and the operator call itself, which
needs an NPU. None of these calls has been run on Ascend hardware yet. Every operator is cited with the torch-npu
documentation (Ascend/op-plugin docs/context/*.md) or the vllm-ascend call site it follows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv4.backends.contracts import FP4_BLOCK, FP8_BLOCK
from dsv4.backends.npu import e4m3
from dsv4.backends.npu.exact_gemm import fp4_weight_int, fp8_weight_int

MAX_ROTARY_HEADS = 1000     # npu_rotary_mul, interleave mode: B * N < 1000
MAX_GROUPS = 32             # experts per npu_grouped_matmul call: bounds the dequantised bf16 weights held at once


def _torch_npu():
    import torch_npu

    return torch_npu


# -- rms_norm: torch_npu.npu_rms_norm -----------------------------------------------------------------------------
def rms_norm_operands(x: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_rms_norm(x, gamma, epsilon) computes x * rstd * gamma with gamma in x's dtype. The contract multiplies an
    fp32 weight in fp32 and casts once, so both go in as fp32 (gamma = ones for an unweighted norm)."""
    gamma = weight.float() if weight is not None else torch.ones(x.shape[-1], dtype=torch.float32, device=x.device)
    return x.float(), gamma


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf, gamma = rms_norm_operands(x, weight)
    return _torch_npu().npu_rms_norm(xf, gamma, epsilon=eps)[0].to(x.dtype)


# -- rope: torch_npu.npu_rotary_mul(rotary_mode="interleave") ------------------------------------------------------
def rope_operands(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  inverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rotated last 2r dims as a 4-D BSND tensor [1, S, N, 2r] in fp32 and cos/sin as [1, S, 1, 2r].

    npu_rotary_mul's interleave mode computes r1 * x + r2 * (-x[1::2], x[::2]) interleaved, i.e. for each pair
    (a, b): (a c - b s, b c + a s) with r1 = (c, c) and r2 = (s, s): the contract's rotation; -sin gives the inverse.
    The trailing leading dims over which cos is broadcast become the head axis N (at most MAX_ROTARY_HEADS), the
    rest the sequence axis S, so cos/sin are materialised per token, not per head.
    """
    d, r = x.shape[-1], cos.shape[-1]
    lead = x.shape[:-1]
    c = cos.reshape((1,) * (len(lead) + 1 - cos.dim()) + cos.shape)
    s = sin.reshape(c.shape)
    split = len(lead)
    while split > 0 and c.shape[split - 1] == 1 and math.prod(lead[split - 1:]) < MAX_ROTARY_HEADS:
        split -= 1
    rows, heads = math.prod(lead[:split]), math.prod(lead[split:])
    x4 = x[..., d - 2 * r:].float().reshape(1, rows, heads, 2 * r).contiguous()

    def table(t: torch.Tensor) -> torch.Tensor:
        full = t.float().expand(*lead[:split], *t.shape[split:])
        return full.reshape(1, rows, 1, r).repeat_interleave(2, dim=-1).contiguous()

    return x4, table(c), table(-s if inverse else s)


def rope_assemble(x: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
    """The pass-through dims and the rotated ones back in x's shape, one cast to x's dtype."""
    d, width = x.shape[-1], rotated.shape[-1]
    return torch.cat((x[..., :d - width].float(), rotated.reshape(*x.shape[:-1], width)), dim=-1).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    x4, r1, r2 = rope_operands(x, cos, sin, inverse)
    return rope_assemble(x, _torch_npu().npu_rotary_mul(x4, r1, r2, rotary_mode="interleave"))


# -- linear: torch.matmul (aclnnMatmul on the cube) ----------------------------------------------------------------
def grouped_linear_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., G, K], weight [G, N, K] -> bmm operands [G, M, K] and [G, K, N]."""
    groups, k = x.shape[-2:]
    return x.reshape(-1, groups, k).transpose(0, 1), weight.transpose(1, 2)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in the wider operand dtype (fp32 products and accumulation on the cube), one cast to x's dtype;
    a grouped weight [G, N, K] is one batched matmul."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    xc, wc = x.to(dtype), weight.to(dtype)
    if weight.dim() == 2:
        return F.linear(xc, wc).to(x.dtype)
    y = torch.bmm(*grouped_linear_operands(xc, wc))                                   # [G, M, N]
    return y.transpose(0, 1).reshape(*x.shape[:-1], weight.shape[1]).to(x.dtype)


# -- quant_linear: dequantise to bf16, then the matmul -------------------------------------------------------------
def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 [N, K] with 128x128 scales, or packed FP4 [N, K/2] with 1x32 scales -> bf16 [N, K]. Exact: e4m3 and
    e2m1 values have at most 4 significant bits and the scales are powers of two (normal ones)."""
    if weight.dtype == torch.float8_e4m3fn:
        n, k = weight.shape
        values = fp8_weight_int(weight).float() * 2.0 ** -e4m3.SHIFT
        scales = scale.float().repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    elif weight.dtype == torch.int8:
        values = fp4_weight_int(weight).float() * 0.5
        scales = scale.float().repeat_interleave(FP4_BLOCK, 1)
    else:
        raise ValueError(f"quant_linear: weight dtype {weight.dtype} is neither float8_e4m3fn nor packed-fp4 int8")
    return (values * scales).to(torch.bfloat16)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the contract's per-token, per-128 e4m3 grid, held exactly in bf16."""
    xi, scale = e4m3.quantize_act(x)
    values = xi.float() * 2.0 ** -e4m3.SHIFT
    return (values * scale.repeat_interleave(FP8_BLOCK, dim=-1)).to(torch.bfloat16)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The FP8/FP4 GEMM as a bf16 matmul of the exactly dequantised operands: only the order of the fp32
    accumulation differs from the contract. Atlas A2/A3 have no FP8 matmul; the weight is dequantised per call."""
    return F.linear(quantize_activation(x), dequantize_weight(weight, scale))


# -- grouped_quant_linear: torch_npu.npu_grouped_matmul ------------------------------------------------------------
def expert_chunks(counts: torch.Tensor, max_groups: int) -> list[tuple[int, int, list[int]]]:
    """Split the experts that have rows into calls of at most `max_groups` experts: (first row, end row, experts)."""
    chunks, start, experts, first = [], 0, [], 0
    for e, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        if len(experts) == max_groups:
            chunks.append((first, start, experts))
            experts, first = [], start
        experts.append(e)
        start += count
    if experts:
        chunks.append((first, start, experts))
    return chunks


def grouped_matmul_operands(counts: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' weights dequantised and laid out [G, K, N] (vllm-ascend transposes its MoE weights the same
    way) and group_list = their row counts (group_list_type=1)."""
    w = torch.stack([dequantize_weight(weight[e], scale[e]) for e in experts])        # [G, N, K]
    return w.transpose(1, 2).contiguous(), counts[experts].to(torch.int64)


def grouped_quant_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert through npu_grouped_matmul on dequantised weights, as vllm-ascend's unquantised MoE
    (x=[rows], weight=[w], split_item=2, group_type=0, group_list_type=1; ops/fused_moe/moe_mlp.py)."""
    xq = quantize_activation(x)
    y = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.bfloat16, device=x.device)
    for first, end, experts in expert_chunks(counts, MAX_GROUPS):
        w, group_list = grouped_matmul_operands(counts, weight, scale, experts)
        y[first:end] = _torch_npu().npu_grouped_matmul([xq[first:end]], [w], group_list=group_list, split_item=2,
                                                       group_type=0, group_list_type=1)[0]
    return y


# -- swiglu: torch_npu.npu_swiglu ----------------------------------------------------------------------------------
def swiglu_operands(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """npu_swiglu(x) = silu(A) * B for the halves [A | B] of x. The contract's clamps (gate above only, up both
    sides) are applied first, as MindSpeed-LLM's fused_swiglu_with_limit does; fp32 so the op rounds nothing."""
    gf, uf = g.float(), u.float()
    if limit > 0:
        gf, uf = gf.clamp_max(limit), uf.clamp(-limit, limit)
    return torch.cat((gf, uf), dim=-1)


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, route_weight: torch.Tensor | None) -> torch.Tensor:
    h = _torch_npu().npu_swiglu(swiglu_operands(g, u, limit), dim=-1)
    if route_weight is not None:
        h = h * route_weight.float()[:, None]
    return h.to(torch.bfloat16)
