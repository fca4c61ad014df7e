"""The canonical primitives follow the contract's order bit for bit and are accurate transcendentals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsv4.backends.canonical import primitives as P
from dsv4.backends.contracts import REDUCTION_LANES
from dsv4.formats import fp4_values, to_e4m3

from conftest import bits, same_bits


def contract_order_sum(values: list[float], lanes: int = REDUCTION_LANES) -> np.float32:
    """The contract's reduction written as plain scalar fp32 arithmetic: lanes, then the pairwise tree."""
    acc = [np.float32(0.0)] * lanes
    for i, v in enumerate(values):
        acc[i % lanes] = np.float32(acc[i % lanes] + np.float32(v))
    while len(acc) > 1:
        half = len(acc) // 2
        acc = [np.float32(acc[i] + acc[i + half]) for i in range(half)]
    return acc[0]


def ulp_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|y - ref| in units of the fp32 ulp at ref (subnormal spacing below 2^-126), for finite fp32 refs."""
    ref, y = ref.double(), y.double()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -149)))
    err = (y - ref).abs() / torch.exp2((exponent - 23).clamp_min(-149))
    return err[torch.isfinite(ref.float())]


# -- lane_sum -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 1000])
def test_lane_sum_equals_scalar_loop_of_contract_order_bit_for_bit(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=g) * torch.exp2(torch.randint(-20, 20, (4, n), generator=g).float())
    got = P.lane_sum(x)
    want = torch.tensor([contract_order_sum(row.tolist()) for row in x], dtype=torch.float32)
    assert same_bits(got, want)


def test_lane_sum_over_any_dim_equals_lane_sum_over_last_dim():
    x = torch.randn(37, 3, 5)
    assert same_bits(P.lane_sum(x, dim=0), P.lane_sum(x.permute(1, 2, 0)))


def test_lane_sum_order_matters_it_differs_from_torch_sum_on_some_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g) * torch.exp2(torch.randint(-12, 12, (64, 1000), generator=g).float())
    assert (bits(P.lane_sum(x)) != bits(x.sum(-1))).any()


@pytest.mark.parametrize("budget", [P.BUDGET, 16 * 3])
def test_float_matmul_is_lane_sum_per_output_whatever_the_slicing(monkeypatch, budget):
    monkeypatch.setattr(P, "BUDGET", budget)
    x, w = torch.randn(2, 3, 70), torch.randn(9, 70)
    got = P.float_matmul(x, w)
    want = P.lane_sum(x[..., None, :] * w, dim=-1)
    assert got.shape == (2, 3, 9)
    assert same_bits(got, want)


def test_block_sums_are_the_exact_block_dot_products_rounded_once():
    g = torch.Generator().manual_seed(1)
    xq = to_e4m3(torch.randn(3, 256, generator=g) * 100).float()
    wq = fp4_values(torch.randint(0, 16, (5, 256), generator=g))
    got = P.block_sums(xq, P.block_major(wq, 32))
    assert got.shape == (3, 8, 5)
    xb, wb = xq.numpy().astype(np.float64), wq.numpy().astype(np.float64)
    for m in range(3):
        for kb in range(8):
            for n in range(5):
                exact = math.fsum(xb[m, kb * 32:(kb + 1) * 32] * wb[n, kb * 32:(kb + 1) * 32])
                assert got[m, kb, n].item() == float(np.float32(exact))


# -- transcendentals ----------------------------------------------------------------------------------------------
def _sweep(lo: float, hi: float, n: int = 100_000) -> torch.Tensor:
    return torch.empty(n).uniform_(lo, hi, generator=torch.Generator().manual_seed(7))


def test_exp_within_1_5_ulp_of_fp64_over_its_whole_range():
    x = _sweep(-104.0, 89.0)
    assert ulp_error(P.exp(x), torch.exp(x.double())).max() <= 1.5


def test_exp_edge_cases():
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 89.0, 88.7, -104.0, -103.9, -110.0, 1e-45, -1e-40])
    y = P.exp(x)
    assert y[:2].tolist() == [1.0, 1.0]
    assert y[2] == math.inf and y[3] == 0 and math.isnan(y[4]) and y[5] == math.inf
    assert math.isfinite(y[6]) and y[7] == 0 and y[8] == 2.0 ** -149 and y[9] == 0
    assert y[10:].tolist() == [1.0, 1.0]


def test_log_within_1_ulp_of_fp64_including_subnormals():
    x = torch.exp2(_sweep(-149.0, 128.0)).float()
    x = x[(x > 0) & torch.isfinite(x)]
    assert ulp_error(P.log(x), torch.log(x.double())).max() <= 1.0
    near_one = _sweep(0.5, 2.0)
    assert ulp_error(P.log(near_one), torch.log(near_one.double())).max() <= 1.0


def test_log_edge_cases():
    y = P.log(torch.tensor([0.0, -0.0, math.inf, -1.0, -math.inf, math.nan, 1.0, 2.0 ** -149]))
    assert y[0] == -math.inf and y[1] == -math.inf and y[2] == math.inf
    assert all(math.isnan(v) for v in y[3:6].tolist())
    assert y[6] == 0.0 and y[7] == np.float32(-149 * math.log(2))


def test_log1p_within_1_5_ulp_for_non_negative_inputs():
    x = torch.cat([torch.exp2(_sweep(-149.0, 100.0)).float(), torch.tensor([0.0, 1e-45, 1.0, 3e38])])
    assert ulp_error(P.log1p(x), torch.log1p(x.double())).max() <= 1.5
    assert P.log1p(torch.tensor([math.inf])).item() == math.inf


def test_sigmoid_and_softplus_within_3_ulp_and_correct_at_infinities():
    x = torch.cat([_sweep(-120.0, 120.0), torch.tensor([0.0, -0.0, 1e-45, -1e-45])])
    xd = x.double()
    assert ulp_error(P.sigmoid(x), torch.sigmoid(xd)).max() <= 3.0
    assert ulp_error(P.softplus(x), torch.nn.functional.softplus(xd)).max() <= 3.0
    inf = torch.tensor([math.inf, -math.inf])
    assert P.sigmoid(inf).tolist() == [1.0, 0.0] and P.softplus(inf).tolist() == [math.inf, 0.0]
    assert math.isnan(P.sigmoid(torch.tensor([math.nan])).item())


def test_silu_within_4_ulp_where_results_are_normal():
    x = _sweep(-80.0, 80.0)
    assert ulp_error(P.silu(x), torch.nn.functional.silu(x.double())).max() <= 4.0


def test_sqrt_is_correctly_rounded_bit_for_bit_including_subnormals_and_edge_cases():
    x = torch.cat([torch.exp2(_sweep(-149.0, 128.0)).float(), _sweep(0.0, 4.0),
                   torch.tensor([0.0, -0.0, math.inf, -1.0, -math.inf, math.nan, 1e-45, 3.4028235e38, 4.0, 2.0])])
    with np.errstate(invalid="ignore"):
        want = torch.from_numpy(np.sqrt(x.numpy()))                  # numpy's fp32 sqrt is the IEEE one
    assert same_bits(P.sqrt(x), want)
    assert torch.signbit(P.sqrt(torch.tensor([-0.0]))).item()


def test_rsqrt_is_the_correctly_rounded_reciprocal_of_sqrt():
    x = torch.exp2(_sweep(-100.0, 100.0))
    assert torch.equal(P.rsqrt(x), torch.ones_like(x) / P.sqrt(x))
    assert P.rsqrt(torch.tensor([0.0, math.inf])).tolist() == [math.inf, 0.0]


# -- selection and random numbers ---------------------------------------------------------------------------------
def test_topk_lower_index_breaks_ties_to_the_lower_index_and_treats_signed_zeros_as_equal():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, -0.0, 3.0, 0.0]])
    values, indices = P.topk_lower_index(scores, 6)
    assert indices.tolist() == [[1, 2, 5, 0, 3, 4]]
    assert values.tolist() == [[3.0, 3.0, 3.0, 1.0, 0.0, 0.0]]


def test_counter_uniform_is_a_pure_function_of_its_key():
    req, pos = torch.tensor([0, 5, 5, -7]), torch.tensor([0, 9, 9, 2 ** 40])
    u = P.counter_uniform(123, req, pos, 1000, "cpu")
    assert u.shape == (4, 1000) and u.dtype == torch.float32
    assert torch.equal(u, P.counter_uniform(123, req, pos, 1000, "cpu"))
    assert torch.equal(u[1], u[2])                                    # same key, same draws
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[3])
    assert not torch.equal(u, P.counter_uniform(124, req, pos, 1000, "cpu"))


def test_counter_uniform_values_are_odd_multiples_of_2_pow_minus_24_inside_0_1():
    u = P.counter_uniform(2 ** 63 + 5, torch.arange(8), torch.arange(8) * 3, 20_000, "cpu")
    numerators = (u.double() * 2 ** 24).round()
    assert torch.equal(numerators, u.double() * 2 ** 24)
    assert (numerators % 2 == 1).all() and (u > 0).all() and (u < 1).all()
    assert abs(u.double().mean().item() - 0.5) < 0.005
    assert u.unique().numel() > 0.98 * u.numel()      # 23-bit values: about 1% birthday collisions


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_every_primitive_gives_the_same_bits_on_cpu_and_cuda():
    x = torch.cat([_sweep(-120.0, 120.0), torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-40])])
    positive = torch.exp2(_sweep(-149.0, 128.0)).float()
    for f, arg in [(P.exp, x), (P.sigmoid, x), (P.softplus, x), (P.silu, x), (P.log, positive), (P.log, x),
                   (P.log1p, positive), (P.sqrt, positive), (P.sqrt, x), (P.rsqrt, positive)]:
        assert same_bits(f(arg), f(arg.cuda())), f.__name__
    m = torch.randn(33, 1000) * torch.exp2(torch.randint(-12, 12, (33, 1000)).float())
    assert same_bits(P.lane_sum(m), P.lane_sum(m.cuda()))
    w = torch.randn(50, 1000)
    assert same_bits(P.float_matmul(m, w), P.float_matmul(m.cuda(), w.cuda()))
    xq, wq = to_e4m3(m[:, :768] * 50).float(), to_e4m3(w[:, :768] * 50).float()
    assert same_bits(P.block_sums(xq, P.block_major(wq, 128)),
                     P.block_sums(xq.cuda(), P.block_major(wq.cuda(), 128)))
    req, pos = torch.arange(-3, 5), torch.arange(8) * 1000
    assert torch.equal(P.counter_uniform(9, req, pos, 5000, "cpu"), P.counter_uniform(9, req, pos, 5000, "cuda").cpu())
    scores = torch.randint(0, 5, (7, 300)).float()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(P.topk_lower_index(scores, 40),
                                                         P.topk_lower_index(scores.cuda(), 40)))
