"""The cpu backend's fast kernels (cpu/fast.py) keep their contracts: within each op's tolerance of the canonical
composite, bit for bit where the contract has no tolerance, and only at the `fast` level."""
from __future__ import annotations

import pytest
import torch

from dsv4 import formats
from dsv4.backends.canonical import ops as canonical
from dsv4.backends.conformance import verify
from dsv4.backends.conformance.inputs import OP_CASES, Seed
from dsv4.backends.conformance.report import within
from dsv4.backends.contracts import CONTRACTS, FP4_BLOCK, FP8_BLOCK, KV_FP8_BLOCK
from dsv4.backends.cpu import fast
from dsv4.backends.levels import Level
from dsv4.backends.registry import default_registry

from conftest import same_bits

FAST_CASES = [name for name, case in OP_CASES.items() if case.op in fast.KERNELS]
# Row seeds of a batch big enough for mhc_pre's vectorised mappings as well as the scalar ones.
MANY_ROWS = [Seed.BATCH_FILLER + i for i in range(fast.SCALAR_MHC_ROWS + 1)]


def assert_keeps_contract(op: str, out, ref) -> None:
    """Bit for bit for ops without a tolerance or with integer outputs, else within the contract's tolerance."""
    contract = CONTRACTS[op]
    if contract.exact_only_output or contract.atol == contract.rtol == 0.0:
        assert same_bits(out, ref), f"{op}: bits differ from the canonical composite"
    else:
        ok, detail = within(out, ref, contract.atol, contract.rtol)
        assert ok, f"{op}: {detail}"


@pytest.mark.parametrize("seeds", [list(Seed.CHECK_ROWS), MANY_ROWS], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("name", FAST_CASES)
def test_fast_kernel_keeps_its_contract_on_the_conformance_inputs(name, seeds):
    case = OP_CASES[name]
    args = case.build(seeds)
    assert_keeps_contract(case.op, fast.KERNELS[case.op](*args), getattr(canonical, case.op)(*args))


def edge_values(block: int, qmax: float, grid: list[float], seed: int) -> torch.Tensor:
    """Rows of blocks that hit every rounding decision: grid points and their midpoints (ties), one bf16 ulp either
    side, zeros of both signs, each block scaled by its own power of two and holding +-qmax so that its scale is
    exact; then random values whose block maxima are not powers of two."""
    grid_t = torch.tensor(grid)
    mids = (grid_t[1:] + grid_t[:-1]) / 2
    points = torch.cat((grid_t, mids, mids.bfloat16().float().nextafter(torch.tensor(0.0)),
                        mids.bfloat16().float().nextafter(torch.tensor(100.0)), torch.tensor([0.0, -0.0])))
    points = torch.cat((points, -points))
    pad = -points.numel() % (block - 1)
    blocks = torch.cat((points, points[:pad])).view(-1, block - 1)
    blocks = torch.cat((blocks, torch.full((blocks.shape[0], 1), qmax)), 1)
    scales = 2.0 ** torch.arange(-8, 8, dtype=torch.float32)[torch.arange(blocks.shape[0]) % 16]
    exact = (blocks * scales[:, None]).flatten()
    noise = torch.randn(8 * block, generator=torch.Generator().manual_seed(seed)) * 3
    values = torch.cat((exact, noise))
    return values[:values.numel() // block * block].view(-1, block).bfloat16()


FP8_GRID = [v for v in torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
            if v == v and v >= 0]
FP4_GRID = sorted(set(abs(v) for v in formats.FP4_VALUES))


@pytest.mark.parametrize("fmt, block, qmax, grid", [("fp8", KV_FP8_BLOCK, formats.FP8_MAX, FP8_GRID),
                                                    ("fp8", FP8_BLOCK, formats.FP8_MAX, FP8_GRID),
                                                    ("fp4", FP4_BLOCK, formats.FP4_MAX, FP4_GRID)])
def test_fake_quant_and_encode_rows_match_the_canonical_bits_at_every_rounding_edge(fmt, block, qmax, grid):
    x = edge_values(block, qmax, sorted(grid), seed=block)
    assert same_bits(fast.fake_quant(x, fmt, block), canonical.fake_quant(x, fmt, block))
    rounded = canonical.fake_quant(x, fmt, block)
    assert same_bits(fast.encode_rows(rounded, fmt, block), canonical.encode_rows(rounded, fmt, block))


def test_quantised_activations_are_the_canonical_e4m3_values():
    x = edge_values(FP8_BLOCK, formats.FP8_MAX, FP8_GRID, seed=7)                # [tokens, 128]
    q, scale = formats.quantize_act_fp8(x, FP8_BLOCK)
    want = (q.float().unflatten(-1, (-1, FP8_BLOCK)) * scale[..., None]).flatten(-2)
    assert same_bits(fast._quantised_activations(x), want)


def test_a_changed_weight_is_dequantised_again():
    x = OP_CASES["quant_linear_fp8"].build(list(Seed.CHECK_ROWS))[0]
    w, s = formats.quantize_weight_fp8(torch.rand(192, 256) * 0.1)
    before = fast.quant_linear(x, w, s)
    w.copy_(formats.quantize_weight_fp8(-torch.rand(192, 256) * 0.1)[0])
    after = fast.quant_linear(x, w, s)
    assert not torch.equal(before, after)
    assert_keeps_contract("quant_linear", after, canonical.quant_linear(x, w, s))


def test_fast_kernels_serve_only_the_fast_level():
    registry = default_registry()
    table = registry.resolve("cpu", Level.FAST)
    assert {op for op, k in table.kernels.items() if k.name == "torch_fast"} == set(fast.KERNELS)
    for level in (Level.DETERMINISTIC, Level.BATCH_INVARIANT, Level.EXACT):
        assert {k.name for k in registry.resolve("cpu", level).kernels.values()} == {"canonical"}


def test_a_reshaped_or_sliced_weight_gives_its_own_values():
    base = torch.randn(2 * 64, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    x = torch.randn(3, 2, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    grouped = base.view(2, 64, 128)                  # as the model's grouped wo_a: cached under its base
    assert_keeps_contract("linear", fast.linear(x, grouped), canonical.linear(x, grouped))
    for part in (grouped[1], base[64:]):              # views of part of a weight
        assert_keeps_contract("linear", fast.linear(x[:, 0], part), canonical.linear(x[:, 0], part))


def test_verify_of_the_cpu_backend_at_fast_passes():
    """`dsv4 verify --backend cpu --level fast`: every op case and the tiny preset's logits against the reference."""
    report = verify("cpu", "cpu", Level.FAST)
    assert report.ok, [f"{c.name}: {c.detail}" for c in report.checks if c.status == "fail"]
    assert all(report.kernels[op].startswith("cpu:torch_fast") for op in fast.KERNELS)


def test_grouped_gemm_with_no_row_for_any_expert_gives_an_empty_output():
    """A rank of expert parallelism may hold only experts no token hit: zero rows out, not an error."""
    experts, out_features, in_features = 2, 128, 128
    weight = torch.zeros(experts, out_features, in_features, dtype=torch.float8_e4m3fn)
    scale = torch.ones(experts, 1, 1)
    y = fast.grouped_quant_linear(torch.zeros(0, in_features, dtype=torch.bfloat16), torch.zeros(experts,
                                  dtype=torch.int64), weight, scale)
    assert y.shape == (0, out_features) and y.dtype == torch.bfloat16
