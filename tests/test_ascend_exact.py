"""The npu backend's exact kernels without fp64 or float8, bit for bit against the canonical composite on CPU.

The integer block GEMM (`ascend/exact_gemm.py`) and the integer e4m3 rounding (`ascend/e4m3.py`) are plain torch
integer arithmetic, so they run here exactly as they will on an NPU (there the digit products go through
torch_npu.npu_quant_matmul instead of torch.bmm; `test_ascend_fused.py` checks that call's arguments).
"""
from __future__ import annotations

import pytest
import torch

from dsv4 import formats
from dsv4.backends.canonical import ops as canonical
from dsv4.backends.npu import e4m3, exact_gemm
from dsv4.formats import quantize_weight_fp4, quantize_weight_fp8

from conftest import same_bits


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- e4m3 without a float8 dtype ----------------------------------------------------------------------------------
def every_bfloat16() -> torch.Tensor:
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("scale", [1.0, 2.0 ** -12, 2.0 ** 12, 3.0, 0.7])
def test_e4m3_rounding_equals_torch_float8_cast_for_every_bfloat16_value(scale):
    x = every_bfloat16() * scale
    assert same_bits(e4m3.round_e4m3(x), formats.to_e4m3(x).float())


def test_e4m3_rounding_equals_torch_float8_cast_at_ties_and_their_neighbours():
    grid = torch.arange(256, dtype=torch.uint8)
    grid = grid[(grid & 0x7F) != 0x7F].view(torch.float8_e4m3fn).float().unique()
    mids = (grid[:-1] + grid[1:]) / 2                        # exact in fp32: every tie of the e4m3 grid
    x = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                   torch.tensor([460.0, -1e30, float("inf"), -float("inf"), 2.0 ** -149, -(2.0 ** -149)]),
                   torch.randn(200_000, generator=gen(0)) * 50])
    assert same_bits(e4m3.round_e4m3(x), formats.to_e4m3(x).float())


def test_e4m3_rounding_keeps_nan():
    assert torch.isnan(e4m3.round_e4m3(torch.tensor([float("nan")]))).all()


def test_e4m3_decode_reads_every_code_as_torch_does():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]                     # NaN codes: never in a checkpoint
    expected = codes.view(torch.float8_e4m3fn).float() * 2 ** e4m3.SHIFT
    assert torch.equal(e4m3.decode(codes).float(), expected)
    assert e4m3.decode(codes).abs().max() == 448 * 2 ** e4m3.SHIFT < 2 ** 18


@pytest.mark.parametrize("fmt,block", [("fp8", 64), ("fp8", 128), ("fp4", 32)])
def test_fake_quant_is_the_canonical_bits(fmt, block):
    x = (torch.randn(6, 512, generator=gen(1)) * 4).bfloat16()
    x[0, :block] = 0.0
    x[1, :block] = -1e-30                                     # rounds to -0.0: the sign must survive
    assert same_bits(e4m3.fake_quant(x, fmt, block), canonical.fake_quant(x, fmt, block))


# -- integer pieces -----------------------------------------------------------------------------------------------
def test_int64_to_float32_rounds_to_nearest_even_like_an_ieee_conversion():
    s = torch.randint(-2 ** 43, 2 ** 43, (300_000,), generator=gen(2))
    edges = [0, 1, -1, 2 ** 24 - 1, 2 ** 24, 2 ** 24 + 1, 2 ** 24 + 3, 2 ** 25 + 2, 2 ** 25 + 6, 2 ** 43 - 1]
    s = torch.cat([s, torch.tensor(edges), -torch.tensor(edges)])
    # fp64 holds these integers exactly, so its cast to fp32 is the single IEEE rounding to compare with.
    assert same_bits(exact_gemm.int64_to_float32(s), s.double().float())


def test_digits_are_int8_and_recombine_to_every_e4m3_integer():
    v = torch.arange(-448 * 2 ** 9, 448 * 2 ** 9 + 1, dtype=torch.int32)
    d = exact_gemm.digits(v, exact_gemm.ACT_DIGITS)
    assert d.dtype == torch.int8
    back = sum(d[i].to(torch.int64) << (exact_gemm.DIGIT_BITS * i) for i in range(exact_gemm.ACT_DIGITS))
    assert torch.equal(back, v.to(torch.int64))


def test_block_sums_are_the_exact_integer_dot_products_of_each_block():
    a = torch.randint(-229376, 229377, (5, 384), generator=gen(3), dtype=torch.int32)
    b = torch.randint(-229376, 229377, (7, 384), generator=gen(4), dtype=torch.int32)
    got = exact_gemm.block_sums(a, b, 128, 3, 3, exact_gemm.torch_int_bmm)
    expected = torch.einsum("mbk,nbk->mbn", a.long().view(5, 3, 128), b.long().view(7, 3, 128))
    assert torch.equal(got, expected)


def test_digit_products_cannot_overflow_int32():
    worst = 127 * 127 * 128                                   # largest |digit product sum| of a 128 block
    assert worst < 2 ** 21 < 2 ** 31


# -- the ops against the canonical composite ----------------------------------------------------------------------
def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_weight_fp8(torch.randn(n, k, generator=gen(seed)) * 0.1)


def fp4_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_weight_fp4(torch.randn(n, k, generator=gen(seed)) * 0.1)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("m,n,k", [(1, 192, 256), (7, 200, 384), (33, 64, 1024), (3, 300, 4096)])
def test_quant_linear_is_the_canonical_bits(fmt, m, n, k):
    x = (torch.randn(m, k, generator=gen(m + n)) * 3).bfloat16()
    weight, scale = (fp8_weight if fmt == "fp8" else fp4_weight)(n, k, seed=k)
    assert same_bits(exact_gemm.quant_linear(x, weight, scale), canonical.quant_linear(x, weight, scale))


def test_quant_linear_is_the_canonical_bits_for_leading_dims_outliers_and_zero_rows():
    x = (torch.randn(2, 3, 256, generator=gen(5)) * 2).bfloat16()
    x[0, 0] = 0.0
    x[0, 1] = -0.0
    x[1, 2, 7] = 3e4                                          # one large value: the rest of its block underflows
    for weight, scale in (fp8_weight(130, 256, 6), fp4_weight(64, 256, 7)):
        assert same_bits(exact_gemm.quant_linear(x, weight, scale), canonical.quant_linear(x, weight, scale))


def test_quant_linear_bits_do_not_depend_on_how_rows_and_columns_are_sliced(monkeypatch):
    x = torch.randn(9, 512, generator=gen(8)).bfloat16()
    weight, scale = fp8_weight(96, 512, 9)
    whole = exact_gemm.quant_linear(x, weight, scale)
    monkeypatch.setattr(exact_gemm, "BUDGET", 300)            # forces 1-row, few-column slices
    assert same_bits(exact_gemm.quant_linear(x, weight, scale), whole)


def test_grouped_quant_linear_is_the_canonical_bits_with_idle_experts():
    experts = [fp4_weight(64, 256, 10 + e) for e in range(4)]
    weight, scale = torch.stack([w for w, _ in experts]), torch.stack([s for _, s in experts])
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 256, generator=gen(11)).bfloat16()
    assert same_bits(exact_gemm.grouped_quant_linear(x, counts, weight, scale),
                     canonical.grouped_quant_linear(x, counts, weight, scale))


def test_quant_linear_rejects_an_unquantised_weight():
    with pytest.raises(ValueError, match="neither float8_e4m3fn nor packed-fp4"):
        exact_gemm.quant_linear(torch.zeros(1, 128).bfloat16(), torch.zeros(4, 128), torch.ones(1, 1))


# -- the whole model ----------------------------------------------------------------------------------------------
def test_npu_integer_kernels_give_the_cpu_reference_logits_on_the_tiny_model(tiny_dir, monkeypatch):
    """The npu backend's registered integer kernels (quantised GEMMs, fake_quant) in the tiny model on CPU, the cube's
    int8 x int8 -> int32 product replaced by an integer matmul: prefill logits bit for bit those of the cpu backend."""
    import sys
    import types

    from dsv4.api import load
    from dsv4.backends.levels import Level
    from dsv4.backends.npu import mapping
    from dsv4.backends.registry import Backend, Registry, add_canonical_kernels

    cube = types.ModuleType("torch_npu")
    cube.npu_quant_matmul = lambda x1, x2, scale, output_dtype: torch.bmm(x1.int(), x2.int())
    monkeypatch.setitem(sys.modules, "torch_npu", cube)
    registry = Registry().discover()
    backend = registry.add_backend(Backend(name="npu-integer-on-cpu", device_types=("cpu",)))
    integer = [e for e in mapping.entries_for(None, triton=False) if e.kind == mapping.INTEGER]
    assert {e.op for e in integer} == {"quant_linear", "grouped_quant_linear", "fake_quant"}
    for entry in integer:
        backend.add(entry.op, entry.load(), entry.level, entry.kernel)
    add_canonical_kernels(backend)
    prompt = [256, *b"def add(a, b):\n    return a + b\n"]
    logits = {}
    for name in ("cpu", "npu-integer-on-cpu"):
        pipe = load(tiny_dir, determinism=Level.EXACT, backend=name, registry=registry)
        assert {op: k.name for op, k in pipe.model.ops.kernels.items() if k.name != "canonical"} == (
            {} if name == "cpu" else {e.op: e.kernel for e in integer})
        logits[name] = pipe.engine().prefill(prompt, 0, all_logits=True)[0]
    assert same_bits(logits["npu-integer-on-cpu"], logits["cpu"])
