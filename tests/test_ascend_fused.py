"""The torch-npu wrappers' layout logic on CPU, and the same wrappers on a real NPU when there is one.

Without an NPU, `torch_npu` is replaced by a double whose operators compute the formula their documentation states
and refuse the arguments their documentation rules out (dtypes, ranks, layouts, limits). That proves what we hand
each operator and that the documented semantics give the contract's result within its tolerance; it does not prove
the real operators behave as documented: the `npu`-marked tests at the bottom do that on hardware.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dsv4.backends import contracts
from dsv4.backends.canonical import ops as canonical
from dsv4.backends.npu import exact_gemm, fused
from dsv4.backends.npu.device import unavailable_reason
from dsv4.formats import quantize_act_fp8, quantize_weight_fp4, quantize_weight_fp8, unpack_fp4

TOLERANCE = {name: (c.atol, c.rtol) for name, c in contracts.CONTRACTS.items()}


def within(op: str, out: torch.Tensor, ref: torch.Tensor) -> bool:
    atol, rtol = TOLERANCE[op]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return bool(((out.double() - ref.double()).abs() <= atol + rtol * ref.double().abs()).all())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class DocumentedTorchNpu(types.ModuleType):
    """torch_npu operators as their documentation (Ascend/op-plugin docs/context) states them. Each call is
    recorded so a test can see which operator ran."""

    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[str] = []

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append("npu_rms_norm")
        assert 1 <= x.dim() <= 8 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert gamma.dtype == x.dtype, "gamma must have x's dtype"
        assert gamma.shape == x.shape[x.dim() - gamma.dim():]
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
        return x * rstd * gamma, rstd

    def npu_rotary_mul(self, x, r1, r2, rotary_mode="half"):
        self.calls.append("npu_rotary_mul")
        assert rotary_mode == "interleave"
        assert x.dim() == 4 and r1.shape == r2.shape and r1.dim() == 4
        b, s, n, d = x.shape                                    # BSND
        assert d % 2 == 0 and d < 896 and b * n < 1000
        assert tuple(r1.shape) in {(1, s, 1, d), (b, s, 1, d), (b, s, n, d)}, "r1 must be 1S1D, BS1D or BSND"
        assert x.is_contiguous() and r1.is_contiguous()
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return r1 * x + r2 * rotated

    def npu_grouped_matmul(self, x, weight, *, group_list, split_item, group_type, group_list_type, **unused):
        self.calls.append("npu_grouped_matmul")
        assert not unused and split_item == 2 and group_type == 0 and group_list_type == 1
        assert len(x) == 1 and x[0].dim() == 2 and len(weight) == 1 and weight[0].dim() == 3
        assert group_list.dtype == torch.int64 and group_list.shape == (weight[0].shape[0],)
        assert int(group_list.sum()) == x[0].shape[0]
        rows = torch.split(x[0], group_list.tolist())
        return [torch.cat([(r.float() @ w.float()).to(x[0].dtype) for r, w in zip(rows, weight[0])])]

    def npu_swiglu(self, x, dim=-1):
        self.calls.append("npu_swiglu")
        assert x.is_contiguous() and x.shape[dim] % 2 == 0
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_quant_matmul(self, x1, x2, scale, *, output_dtype=None, **unused):
        self.calls.append("npu_quant_matmul")
        assert not unused and x1.dtype == x2.dtype == torch.int8 and output_dtype == torch.int32
        assert 2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6 and max(x1.shape[-1], x2.shape[-1]) <= 65535
        assert scale.dtype == torch.float32 and scale.dim() == 1 and scale.numel() in (1, x2.shape[-1])
        return (x1.to(torch.int64) @ x2.to(torch.int64)).to(torch.int32)


@pytest.fixture
def npu_double(monkeypatch) -> DocumentedTorchNpu:
    double = DocumentedTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    return double


# -- rms_norm -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_hands_fp32_x_and_gamma_and_meets_the_contract(npu_double, weighted):
    x = (torch.randn(3, 5, 256, generator=gen(0)) * 3).bfloat16()
    w = torch.rand(256, generator=gen(1)) + 0.5 if weighted else None
    out = fused.rms_norm(x, w, 1e-6)
    assert npu_double.calls == ["npu_rms_norm"]
    assert within("rms_norm", out, canonical.rms_norm(x, w, 1e-6))


# -- rope ---------------------------------------------------------------------------------------------------------
ROPE_SHAPES = [   # (x shape, cos shape): the model's uses plus decode and very many heads
    ((2, 3, 4, 128), (2, 3, 1, 32)),     # q per head, cos broadcast over heads
    ((2, 3, 128), (2, 3, 32)),           # kv
    ((5, 96), (5, 32)),                  # compressed entries
    ((1, 1, 4, 128), (1, 1, 1, 32)),     # one-token decode
    ((1, 2, 1200, 64), (1, 2, 1, 32)),   # more heads than npu_rotary_mul allows: cos expanded over them
]


@pytest.mark.parametrize("x_shape,cos_shape", ROPE_SHAPES)
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_layout_is_a_valid_bsnd_call_and_meets_the_contract(npu_double, x_shape, cos_shape, inverse):
    x = (torch.randn(x_shape, generator=gen(2)) * 2).bfloat16()
    angle = torch.rand(cos_shape, generator=gen(3), dtype=torch.float64) * 6.283
    cos, sin = angle.cos().float(), angle.sin().float()
    out = fused.rope(x, cos, sin, inverse)
    assert npu_double.calls == ["npu_rotary_mul"]
    ref = canonical.rope(x, cos, sin, inverse)
    assert within("rope", out, ref)
    d, r = x.shape[-1], cos.shape[-1]
    assert torch.equal(out[..., :d - 2 * r], x[..., :d - 2 * r])   # pass-through dims untouched


def test_rope_puts_the_broadcast_dims_on_the_head_axis():
    x, r1, r2 = fused.rope_operands(torch.zeros(2, 3, 4, 128), torch.zeros(2, 3, 1, 32), torch.zeros(2, 3, 1, 32),
                                    False)
    assert x.shape == (1, 6, 4, 64) and r1.shape == r2.shape == (1, 6, 1, 64)


# -- linear -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype,w_dtype,w_shape", [
    (torch.bfloat16, torch.bfloat16, (96, 256)), (torch.float32, torch.float32, (40, 256)),
    (torch.bfloat16, torch.bfloat16, (2, 64, 128))])
def test_linear_and_grouped_linear_meet_the_contract(x_dtype, w_dtype, w_shape):
    x = torch.randn(3, 2, w_shape[-1], generator=gen(4)).to(x_dtype)
    w = (torch.randn(w_shape, generator=gen(5)) * 0.1).to(w_dtype)
    assert within("linear", fused.linear(x, w), canonical.linear(x, w))


# -- quant_linear (dequantise, then the matmul) -------------------------------------------------------------------
def test_dequantised_weights_and_activations_are_exact_in_bfloat16():
    w8, s8 = quantize_weight_fp8(torch.randn(130, 256, generator=gen(6)) * 0.1)
    reference8 = w8.float() * s8.repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)
    assert torch.equal(fused.dequantize_weight(w8, s8).float(), reference8)
    w4, s4 = quantize_weight_fp4(torch.randn(64, 256, generator=gen(7)) * 0.1)
    assert torch.equal(fused.dequantize_weight(w4, s4).float(), unpack_fp4(w4) * s4.repeat_interleave(32, 1))
    x = (torch.randn(4, 256, generator=gen(8)) * 3).bfloat16()
    xq, scale = quantize_act_fp8(x, 128)
    assert torch.equal(fused.quantize_activation(x).float(), xq.float() * scale.repeat_interleave(128, -1))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_dequant_matmul_meets_the_quant_linear_contract(fmt):
    x = (torch.randn(5, 512, generator=gen(9)) * 3).bfloat16()
    quantize = quantize_weight_fp8 if fmt == "fp8" else quantize_weight_fp4
    w, s = quantize(torch.randn(192, 512, generator=gen(10)) * 0.1)
    assert within("quant_linear", fused.quant_linear(x, w, s), canonical.quant_linear(x, w, s))


# -- grouped_quant_linear (npu_grouped_matmul) --------------------------------------------------------------------
def test_expert_chunks_skip_idle_experts_and_cap_the_group_count():
    counts = torch.tensor([2, 0, 3, 1, 0, 4])
    assert fused.expert_chunks(counts, max_groups=2) == [(0, 5, [0, 2]), (5, 10, [3, 5])]
    assert fused.expert_chunks(torch.zeros(3, dtype=torch.int64), max_groups=2) == []


def test_grouped_quant_linear_layout_and_contract(npu_double, monkeypatch):
    monkeypatch.setattr(fused, "MAX_GROUPS", 2)
    experts = [quantize_weight_fp4(torch.randn(64, 256, generator=gen(20 + e)) * 0.1) for e in range(5)]
    weight, scale = torch.stack([w for w, _ in experts]), torch.stack([s for _, s in experts])
    counts = torch.tensor([2, 0, 3, 1, 4])
    x = (torch.randn(10, 256, generator=gen(12)) * 2).bfloat16()
    out = fused.grouped_quant_linear(x, counts, weight, scale)
    assert npu_double.calls == ["npu_grouped_matmul"] * 2
    assert within("grouped_quant_linear", out, canonical.grouped_quant_linear(x, counts, weight, scale))


# -- swiglu -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit,routed", [(10.0, True), (0.0, False)])
def test_swiglu_clamps_before_the_operator_and_meets_the_contract(npu_double, limit, routed):
    g = (torch.randn(6, 128, generator=gen(13)) * 14).bfloat16()
    u = (torch.randn(6, 128, generator=gen(14)) * 14).bfloat16()
    rw = torch.rand(6, generator=gen(15)) if routed else None
    out = fused.swiglu(g, u, limit, rw)
    assert npu_double.calls == ["npu_swiglu"]
    assert within("swiglu", out, canonical.swiglu(g, u, limit, rw))


# -- the exact GEMM's cube call -----------------------------------------------------------------------------------
def test_integer_gemm_on_the_cube_call_is_documented_and_still_the_canonical_bits(npu_double):
    x = (torch.randn(3, 512, generator=gen(16)) * 3).bfloat16()
    w, s = quantize_weight_fp8(torch.randn(160, 512, generator=gen(17)) * 0.1)
    out = exact_gemm.npu_quant_linear(x, w, s)
    assert npu_double.calls and set(npu_double.calls) == {"npu_quant_matmul"}
    assert torch.equal(out.view(torch.int16), canonical.quant_linear(x, w, s).view(torch.int16))


# -- on a real NPU ------------------------------------------------------------------------------------------------
NPU_REASON = unavailable_reason()
needs_npu = pytest.mark.skipif(NPU_REASON is not None, reason=f"needs an Ascend NPU: {NPU_REASON}")


@pytest.mark.npu
@needs_npu
@pytest.mark.parametrize("op", ["rms_norm", "rope", "linear", "quant_linear", "grouped_quant_linear", "swiglu"])
def test_fused_kernel_on_the_npu_meets_the_contract(op):
    from dsv4.backends.conformance import OP_CASES, Seed
    from dsv4.backends.npu import build_backend
    from dsv4.backends.npu.device import detect_chip

    backend = build_backend(detect_chip(), triton=False)
    kernel = next(k for k in backend.kernels[op] if k.name != "canonical")
    for case in (c for c in OP_CASES.values() if c.op == op):
        args = case.build(list(Seed.BATCH_TARGETS[:2]))
        on_npu = [a.to("npu") if isinstance(a, torch.Tensor) else a for a in args]
        assert within(op, kernel.fn(*on_npu).cpu(), getattr(canonical, op)(*args)), case.name


@pytest.mark.npu
@needs_npu
def test_integer_gemm_on_the_npu_is_the_cpu_bits():
    x = (torch.randn(3, 512, generator=gen(18)) * 3).bfloat16()
    for w, s in (quantize_weight_fp8(torch.randn(160, 512) * 0.1), quantize_weight_fp4(torch.randn(64, 512) * 0.1)):
        out = exact_gemm.npu_quant_linear(x.to("npu"), w.to("npu"), s.to("npu")).cpu()
        assert torch.equal(out.view(torch.int16), canonical.quant_linear(x, w, s).view(torch.int16))
