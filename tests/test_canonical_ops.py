"""The canonical ops compute what their contracts say, in the stated order, independently of batch neighbours."""
from __future__ import annotations

import functools
import gc
import inspect
import math
import re

import numpy as np
import pytest
import torch

from dsv4 import formats
from dsv4.backends.canonical import ops
from dsv4.backends.contracts import CONTRACTS, FP32_TOLERANCE, Ops, parameters
from dsv4.cache import PagedRows

from conftest import assert_within_contract, same_bits

BF16 = torch.bfloat16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


# -- one small input set per op, shared by the shape test and the CPU-vs-CUDA test -----------------------------
def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return formats.quantize_weight_fp8(randn(n, k, seed=seed, scale=0.05))


def fp4_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return formats.quantize_weight_fp4(randn(n, k, seed=seed, scale=0.05))


STORED = 150          # rows of the attention cases' shared storage; R + j is fresh row j of a sequence


def kv_values(rows: int, seed: int, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """KV vectors on the cache's storage grid: 64 FP8 dims (blocks of 64), then 64 RoPE dims in bf16."""
    v = randn(*lead, rows, 128, seed=seed, dtype=BF16)
    return torch.cat([formats.fake_quant(v[..., :64], "fp8", 64), v[..., 64:]], dim=-1)


def attention_inputs(seed: int, s: int = 3, width: int = 140) -> tuple:
    """(q, kv storage, fresh rows, idx, sink, scale): idx mixes stored rows, fresh rows and empty slots."""
    q = randn(2, s, 4, 128, seed=seed, dtype=BF16)
    store = PagedRows.holding(kv_values(STORED, seed + 1), "fp8", 64, 64)
    fresh = kv_values(s, seed + 5, (2,))
    idx = torch.randint(0, STORED + s, (2, s, width), generator=gen(seed + 2))
    idx[torch.rand(idx.shape, generator=gen(seed + 3)) < 0.2] = -1
    return q, store, fresh, idx, randn(4, seed=seed + 4), 128 ** -0.5


def keys_with_first_dims(first: list[float], d: int = 32) -> PagedRows:
    """FP4 indexer keys, one block of len(first) entries: key t is first[t] in dim 0 and zero elsewhere."""
    values = torch.zeros(len(first), d, dtype=BF16)
    values[:, 0] = torch.tensor(first)
    return PagedRows.holding(values, "fp4", 32, 0, entries_per_block=len(first))


@functools.cache
def op_cases() -> dict[str, tuple[str, tuple, list[tuple[tuple[int, ...], torch.dtype]]]]:
    """case name -> (op name, args, expected [(shape, dtype)] of the outputs)."""
    w8, s8 = fp8_weight(130, 256, seed=10)
    w4, s4 = fp4_weight(64, 256, seed=11)
    gw = torch.stack([fp4_weight(48, 256, seed=20 + e)[0] for e in range(3)])
    gs = torch.stack([fp4_weight(48, 256, seed=20 + e)[1] for e in range(3)])
    score = randn(5, 8, 16, seed=13)
    score[:, :4, :3] = -math.inf
    hc_x = randn(2, 3, 4, 32, seed=14, dtype=BF16)
    experts = torch.randint(0, 8, (6, 2), generator=gen(15))
    order, _ = ops.moe_dispatch(experts, 8)
    q, kv, fresh, idx, sink, scale = attention_inputs(16)
    index_keys = PagedRows.holding(formats.fake_quant(randn(24, 32, seed=24, dtype=BF16), "fp4", 32), "fp4", 32, 0,
                                   entries_per_block=8)
    hca_table = torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=torch.int32)
    hca_kv = PagedRows.holding(kv_values(70, 25), "fp8", 64, 64, pool_base=10, entries_per_block=20)
    cos_sin = torch.rand(2, 3, 1, 8, generator=gen(17)) * 6.3
    logits = randn(4, 300, seed=18, scale=3.0)
    return {
        "rms_norm": ("rms_norm", (randn(2, 3, 64, seed=1, dtype=BF16), torch.rand(64, generator=gen(2)), 1e-6),
                     [((2, 3, 64), BF16)]),
        "rope": ("rope", (randn(2, 3, 4, 32, seed=3, dtype=BF16), cos_sin.cos(), cos_sin.sin(), False),
                 [((2, 3, 4, 32), BF16)]),
        "rope_inverse": ("rope", (randn(2, 3, 4, 32, seed=3), cos_sin.cos(), cos_sin.sin(), True),
                         [((2, 3, 4, 32), torch.float32)]),
        "hadamard": ("hadamard", (randn(2, 3, 64, seed=4, dtype=BF16),), [((2, 3, 64), BF16)]),
        "fake_quant_fp8": ("fake_quant", (randn(2, 3, 128, seed=5, dtype=BF16), "fp8", 64), [((2, 3, 128), BF16)]),
        "fake_quant_fp4": ("fake_quant", (randn(2, 3, 128, seed=5, dtype=BF16), "fp4", 32), [((2, 3, 128), BF16)]),
        "linear": ("linear", (randn(2, 3, 96, seed=6, dtype=BF16), randn(40, 96, seed=7, dtype=BF16)),
                   [((2, 3, 40), BF16)]),
        "linear_grouped": ("linear", (randn(2, 3, 4, 48, seed=8), randn(4, 24, 48, seed=9)),
                           [((2, 3, 4, 24), torch.float32)]),
        "quant_linear_fp8": ("quant_linear", (randn(2, 3, 256, seed=12, dtype=BF16), w8, s8), [((2, 3, 130), BF16)]),
        "quant_linear_fp4": ("quant_linear", (randn(5, 256, seed=12, dtype=BF16), w4, s4), [((5, 64), BF16)]),
        "grouped_quant_linear": ("grouped_quant_linear", (randn(7, 256, seed=19, dtype=BF16),
                                                          torch.tensor([3, 0, 4]), gw, gs), [((7, 48), BF16)]),
        "compress_pool": ("compress_pool", (randn(5, 8, 16, seed=21), score), [((5, 16), torch.float32)]),
        "indexer_topk": ("indexer_topk", (randn(2, 3, 4, 32, seed=22, dtype=BF16), randn(2, 3, 4, seed=23),
                                          index_keys, torch.tensor([[2, 0, 1], [0, 2, 1]], dtype=torch.int32),
                                          torch.tensor([[20, 9, 3], [0, 1, 15]]), 8), [((2, 3, 8), torch.int64)]),
        "sparse_attention": ("sparse_attention", (q, kv, fresh, idx, sink, scale), [((2, 3, 4, 128), BF16)]),
        "hca_attention": ("hca_attention", (q, hca_kv, fresh, idx[..., :10].clamp(max=9), hca_table,
                                            torch.tensor([[0, 20, 50], [7, 3, 0]]), sink, scale),
                          [((2, 3, 4, 128), BF16)]),
        "mhc_pre": ("mhc_pre", (hc_x, randn(24, 128, seed=25, scale=0.1), torch.tensor([0.5, 0.7, 1.3]),
                                randn(24, seed=26), 1e-6, 1e-6, 20),
                    [((2, 3, 32), BF16), ((2, 3, 4), torch.float32), ((2, 3, 4, 4), torch.float32)]),
        "mhc_post": ("mhc_post", (randn(2, 3, 32, seed=27, dtype=BF16), hc_x, torch.rand(2, 3, 4, generator=gen(28)),
                                  torch.rand(2, 3, 4, 4, generator=gen(29))), [((2, 3, 4, 32), BF16)]),
        "mhc_head": ("mhc_head", (hc_x, randn(4, 128, seed=30, scale=0.1), torch.tensor([0.8]), randn(4, seed=31),
                                  1e-6, 1e-6), [((2, 3, 32), BF16)]),
        "moe_gate": ("moe_gate", (randn(6, 32, seed=32, dtype=BF16), randn(8, 32, seed=33), randn(8, seed=34), None,
                                  2, 1.5), [((6, 2), torch.float32), ((6, 2), torch.int64)]),
        "moe_gate_hash": ("moe_gate", (randn(6, 32, seed=32, dtype=BF16), randn(8, 32, seed=33), None,
                                       experts, 2, 2.5), [((6, 2), torch.float32), ((6, 2), torch.int64)]),
        "moe_dispatch": ("moe_dispatch", (experts, 8), [((12,), torch.int64), ((8,), torch.int64)]),
        "swiglu": ("swiglu", (randn(5, 40, seed=35, dtype=BF16, scale=8), randn(5, 40, seed=36, dtype=BF16, scale=8),
                              10.0, torch.rand(5, generator=gen(37))), [((5, 40), BF16)]),
        "moe_combine": ("moe_combine", (randn(12, 32, seed=38, dtype=BF16), order, 2,
                                        randn(6, 32, seed=39, dtype=BF16)), [((6, 32), BF16)]),
        "sample": ("sample", (logits, torch.tensor([0.0, 0.7, 1.0, 1.3]), torch.tensor([1.0, 0.9, 0.5, 1.0]), 33377335,
                              torch.tensor([0, 1, 2, 3]), torch.tensor([10, 10, 11, 12])), [((4,), torch.int64)]),
    }


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def to_device(arg, device: str):
    return arg.to(device) if isinstance(arg, (torch.Tensor, PagedRows)) else arg


# -- the interface ------------------------------------------------------------------------------------------------
def contract_parameter_names(signature: str) -> list[str]:
    """The leading identifier of each top-level parameter in a contract's `name(p1[...] type, p2, ...) -> ...`."""
    names, depth, start = [], 0, signature.index("(") + 1
    for i in range(start, len(signature)):
        ch = signature[i]
        depth += 1 if ch in "[(" else -1 if ch in "])" else 0
        if (ch == "," and depth == 0) or depth < 0:
            names.append(re.match(r"\s*(\w+)", signature[start:i]).group(1))
            start = i + 1
        if depth < 0:
            return names
    raise ValueError(f"unbalanced signature {signature!r}")


def test_the_typed_op_table_has_one_method_per_contract():
    methods = {name for name, value in vars(Ops).items() if callable(value) and not name.startswith("_")}
    assert methods == set(CONTRACTS)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_every_contract_has_an_op_with_the_contracts_parameters(name):
    """The contract's text, its typed method on Ops and its canonical composite name the same parameters."""
    assert parameters(name) == contract_parameter_names(CONTRACTS[name].signature)
    assert list(inspect.signature(getattr(ops, name)).parameters) == parameters(name)


@pytest.mark.parametrize("case", sorted(op_cases()))
def test_every_op_returns_the_contracts_shapes_and_dtypes(case):
    name, args, expected = op_cases()[case]
    outputs = as_tuple(getattr(ops, name)(*args))
    assert [(tuple(o.shape), o.dtype) for o in outputs] == expected


# -- norms, rotations ---------------------------------------------------------------------------------------------
def test_rms_norm_matches_fp64_reference():
    x, w = randn(4, 256, seed=1, dtype=BF16), torch.rand(256, generator=gen(2))
    xd = x.double()
    ref = w.double() * xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6)
    assert_within_contract("rms_norm", ops.rms_norm(x, w, 1e-6), ref)
    assert ops.rms_norm(x, None, 1e-6).dtype == BF16


def test_rope_rotates_interleaved_pairs_of_the_last_dims_and_inverse_undoes_it():
    x = randn(3, 2, 40, seed=3)
    angle = torch.rand(3, 1, 8, generator=gen(4)) * 6.3
    y = ops.rope(x, angle.cos(), angle.sin(), False)
    assert torch.equal(y[..., :24], x[..., :24])
    pairs = torch.view_as_complex(x[..., 24:].double().unflatten(-1, (-1, 2)).contiguous())
    ref = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle.double()), angle.double())).flatten(-2)
    torch.testing.assert_close(y[..., 24:].double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ops.rope(y, angle.cos(), angle.sin(), True), x, atol=1e-6, rtol=1e-6)


def test_hadamard_is_the_scaled_sylvester_matrix():
    n = 64
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = randn(5, n, seed=5, dtype=BF16)
    assert_within_contract("hadamard", ops.hadamard(x), x.double() @ h.T / math.sqrt(n))


def test_linear_matches_fp64_reference_and_grouped_linear_is_linear_per_group():
    x, w = randn(3, 300, seed=6, dtype=BF16), randn(50, 300, seed=7, dtype=BF16)
    assert_within_contract("linear", ops.linear(x, w), x.double() @ w.double().T)
    xg, wg = randn(2, 4, 48, seed=8), randn(4, 24, 48, seed=9)
    y = ops.linear(xg, wg)
    assert all(same_bits(y[:, g], ops.linear(xg[:, g], wg[g])) for g in range(4))


# -- quantised GEMMs ----------------------------------------------------------------------------------------------
def per_block_loop_quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The quantised-GEMM contract as a scalar loop: exact block sums in fp64, then fp32 scale products and sums."""
    xq, xs = formats.quantize_act_fp8(x, 128)
    xq, xs = xq.float().double().numpy(), xs.numpy()
    fp8 = weight.dtype == torch.float8_e4m3fn
    w = (weight.float() if fp8 else formats.unpack_fp4(weight)).double().numpy()
    ws = scale.float().numpy()
    block = 128 if fp8 else 32
    out = np.zeros((xq.shape[0], w.shape[0]), dtype=np.float32)
    for m in range(xq.shape[0]):
        for n in range(w.shape[0]):
            acc = None
            for kb in range(xq.shape[1] // block):
                blk = slice(kb * block, (kb + 1) * block)
                block_sum = np.float32(np.dot(xq[m, blk], w[n, blk]))
                act_scale = xs[m, kb] if fp8 else xs[m, kb // 4]
                w_scale = ws[n // 128, kb] if fp8 else ws[n, kb]
                term = np.float32(np.float32(block_sum * act_scale) * w_scale)
                acc = term if acc is None else np.float32(acc + term)
            out[m, n] = acc
    return torch.from_numpy(out).to(BF16)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quant_linear_equals_a_per_block_loop_and_the_dequantised_fp64_product(fmt):
    x = randn(3, 256, seed=12, dtype=BF16)
    weight, scale = fp8_weight(130, 256, seed=10) if fmt == "fp8" else fp4_weight(64, 256, seed=11)
    y = ops.quant_linear(x, weight, scale)
    assert same_bits(y, per_block_loop_quant_linear(x, weight, scale))
    xq, xs = formats.quantize_act_fp8(x, 128)
    x_deq = xq.double() * xs.double().repeat_interleave(128, -1)
    w_deq = (formats.dequantize_fp8_weight(weight, scale) if fmt == "fp8"
             else formats.dequantize_fp4_weight(weight, scale)).double()
    ref = x_deq @ w_deq.T
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_quant_linear_row_does_not_depend_on_the_other_rows_or_on_memory_slicing(monkeypatch):
    x = randn(9, 256, seed=13, dtype=BF16)
    weight, scale = fp4_weight(64, 256, seed=11)
    y = ops.quant_linear(x, weight, scale)
    assert all(same_bits(y[i:i + 1], ops.quant_linear(x[i:i + 1], weight, scale)) for i in range(9))
    monkeypatch.setattr(ops, "BUDGET", 40)
    assert same_bits(y, ops.quant_linear(x, weight, scale))


def test_decoded_weights_live_as_long_as_the_weight_and_follow_in_place_changes():
    x = randn(3, 256, seed=12, dtype=BF16)
    weight, scale = fp4_weight(64, 256, seed=11)
    other, _ = fp4_weight(64, 256, seed=14)
    expected = ops.quant_linear(x, other.clone(), scale)
    before = len(ops._decoded)
    ops.quant_linear(x, weight, scale)
    assert len(ops._decoded) == before + 1
    weight.copy_(other)                                          # changed in place: decoded again
    assert same_bits(ops.quant_linear(x, weight, scale), expected)
    del weight
    gc.collect()
    assert len(ops._decoded) == before


def test_grouped_quant_linear_is_quant_linear_of_each_row_with_its_expert():
    _, args, _ = op_cases()["grouped_quant_linear"]
    x, counts, weight, scale = args
    y = ops.grouped_quant_linear(*args)
    experts = torch.repeat_interleave(torch.arange(3), counts)
    for row, e in enumerate(experts.tolist()):
        assert same_bits(y[row:row + 1], ops.quant_linear(x[row:row + 1], weight[e], scale[e]))


# -- attention ----------------------------------------------------------------------------------------------------
def test_compress_pool_is_a_per_channel_softmax_pool_where_minus_inf_rows_weigh_zero():
    kv, score = randn(5, 8, 16, seed=21), randn(5, 8, 16, seed=13)
    score[:, :4, :3] = -math.inf
    ref = (torch.softmax(score.double(), dim=1) * kv.double()).sum(1)
    assert_within_contract("compress_pool", ops.compress_pool(kv, score), ref)
    kv_changed = kv.clone()
    kv_changed[:, :4, :3] = 1e6
    assert same_bits(ops.compress_pool(kv, score)[:, :3], ops.compress_pool(kv_changed, score)[:, :3])


def test_indexer_topk_picks_the_best_visible_keys_ties_to_lower_index_ascending_and_pads_with_minus_one():
    # With a one-hot query and unit weights, S[t] = relu(key[t, 0]) = [2, 4, 4, 0, 4, 3].
    q = torch.zeros(1, 3, 1, 32, dtype=BF16)
    q[..., 0] = 1
    keys = keys_with_first_dims([2.0, 4.0, 4.0, -1.0, 4.0, 3.0])
    table = torch.zeros(1, 1, dtype=torch.int32)
    weights = torch.ones(1, 3, 1)
    top2 = ops.indexer_topk(q, weights, keys, table, torch.tensor([[6, 4, 1]]), 2)
    assert top2.tolist() == [[[1, 2], [1, 2], [0, -1]]]
    top5 = ops.indexer_topk(q, weights, keys, table, torch.tensor([[6, 4, 2]]), 5)
    assert top5.tolist() == [[[0, 1, 2, 4, 5], [0, 1, 2, 3, -1], [0, 1, -1, -1, -1]]]
    assert ops.indexer_topk(q, weights, keys, table, torch.tensor([[6, 6, 0]]), 8)[0, 2].tolist() == [-1] * 8


def test_indexer_reads_each_sequences_keys_through_its_block_table():
    # two blocks of 3 entries: block 0 holds [1, 4, 2], block 1 holds [3, 0.5, 6]; sequence 0 owns (1, 0), 1 owns (0,)
    keys = keys_with_first_dims([1.0, 4.0, 2.0, 3.0, 0.5, 6.0])
    keys.entries_per_block = 3
    q = torch.zeros(2, 1, 1, 32, dtype=BF16)
    q[..., 0] = 1
    table = torch.tensor([[1, 0], [0, 1]], dtype=torch.int32)
    top = ops.indexer_topk(q, torch.ones(2, 1, 1), keys, table, torch.tensor([[6], [3]]), 2)
    assert top.tolist() == [[[2, 4]], [[1, 2]]]      # sequence 0: [3, .5, 6, 1, 4, 2]; sequence 1: [1, 4, 2]


def stored_and_fresh(store: PagedRows, fresh: torch.Tensor) -> torch.Tensor:
    """Every row attention can index for each sequence: [b, R + f, D] (stored rows decoded, then fresh rows)."""
    stored = store.read(torch.arange(store.rows))
    return torch.cat([stored.expand(fresh.shape[0], -1, -1), fresh], dim=1)


def fp64_attention(q, store, fresh, idx, sink, scale) -> torch.Tensor:
    """softmax with sink over the valid idx entries, in fp64, with no bf16 rounding of the probabilities."""
    b, s, heads, d = q.shape
    kv = stored_and_fresh(store, fresh)
    out = torch.zeros(b, s, heads, d, dtype=torch.float64)
    for i in range(b):
        for j in range(s):
            rows = kv[i, idx[i, j][idx[i, j] >= 0]].double()
            scores = scale * q[i, j].double() @ rows.T                     # [H, n]
            top = scores.max(-1, keepdim=True).values
            weights = torch.exp(scores - top)
            den = weights.sum(-1, keepdim=True) + torch.exp(sink.double()[:, None] - top)
            out[i, j] = weights @ rows / den
    return out


def test_sparse_attention_matches_fp64_softmax_with_sink_over_the_valid_slots():
    q, kv, fresh, idx, sink, scale = attention_inputs(40)
    out = ops.sparse_attention(q, kv, fresh, idx, sink, scale)
    assert_within_contract("sparse_attention", out, fp64_attention(q, kv, fresh, idx, sink, scale))


def test_sparse_attention_ignores_minus_one_slots():
    q, kv, fresh, idx, sink, scale = attention_inputs(41)
    out = ops.sparse_attention(q, kv, fresh, idx, sink, scale)
    padded = torch.cat([idx, torch.full((2, 3, 100), -1)], dim=-1)
    assert same_bits(out, ops.sparse_attention(q, kv, fresh, padded, sink, scale))
    empty = ops.sparse_attention(q, kv, fresh, torch.full_like(idx, -1), sink, scale)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_sparse_attention_of_one_query_does_not_depend_on_the_rest_of_the_batch(monkeypatch):
    q, kv, fresh, idx, sink, scale = attention_inputs(42, s=5)
    out = ops.sparse_attention(q, kv, fresh, idx, sink, scale)
    for i in range(2):
        for j in range(5):
            alone = ops.sparse_attention(q[i:i + 1, j:j + 1], kv, fresh[i:i + 1], idx[i:i + 1, j:j + 1], sink, scale)
            assert same_bits(alone, out[i:i + 1, j:j + 1])
    monkeypatch.setattr(ops, "BUDGET", 1)                    # one query per step
    assert same_bits(out, ops.sparse_attention(q, kv, fresh, idx, sink, scale))


def test_hca_attention_is_sparse_attention_over_window_then_visible_compressed_entries():
    q, _, fresh, idx, sink, scale = attention_inputs(43)
    kv = PagedRows.holding(kv_values(70, 44), "fp8", 64, 64, pool_base=10, entries_per_block=20)
    window, n_comp = idx[..., :10].clamp(max=9), torch.tensor([[0, 20, 50], [7, 3, 0]])
    table = torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=torch.int32)
    out = ops.hca_attention(q, kv, fresh, window, table, n_comp, sink, scale)
    for i in range(2):
        for j in range(3):
            entry = torch.arange(int(n_comp[i, j]))
            rows = 10 + table[i].long()[entry // 20] * 20 + entry % 20
            full = torch.cat([window[i, j], rows])
            alone = ops.sparse_attention(q[i:i + 1, j:j + 1], kv, fresh[i:i + 1], full[None, None], sink, scale)
            assert same_bits(alone, out[i:i + 1, j:j + 1])


# -- mHC ----------------------------------------------------------------------------------------------------------
def fp64_mhc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    hc = x.shape[-2]
    xf = x.flatten(2).double()
    mixes = (xf @ fn.double().T) / torch.sqrt((xf * xf).mean(-1, keepdim=True) + norm_eps)
    scale, base = scale.double(), base.double()
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = torch.softmax((mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc)), -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return (pre[..., None] * x.double()).sum(-2), post, comb


def test_mhc_pre_comb_is_doubly_stochastic_after_20_iterations():
    x = randn(4, 8, 4, 64, seed=60, dtype=BF16)
    _, _, comb = ops.mhc_pre(x, randn(24, 256, seed=61, scale=0.05), torch.tensor([1.0, 1.0, 1.0]),
                             randn(24, seed=62), 1e-6, 1e-6, 20)
    assert (comb.double().sum(-1) - 1).abs().max() < 1e-5
    assert (comb.double().sum(-2) - 1).abs().max() < 1e-5


def test_mhc_pre_outputs_match_fp64_reference():
    _, args, _ = op_cases()["mhc_pre"]
    y, post, comb = ops.mhc_pre(*args)
    ref_y, ref_post, ref_comb = fp64_mhc_pre(*args)
    torch.testing.assert_close(post.double(), ref_post, **FP32_TOLERANCE)      # fp32 outputs: fp32's tolerance
    torch.testing.assert_close(comb.double(), ref_comb, **FP32_TOLERANCE)
    assert_within_contract("mhc_pre", y, ref_y)


def test_mhc_post_mixes_the_streams_with_the_transposed_comb():
    _, (f, x, post, comb), _ = op_cases()["mhc_post"]
    ref = post.double()[..., None] * f.double()[..., None, :] + torch.einsum("...jk,...jd->...kd", comb.double(),
                                                                             x.double())
    assert_within_contract("mhc_post", ops.mhc_post(f, x, post, comb), ref)


def test_mhc_head_collapses_the_streams_with_sigmoid_weights():
    _, (x, fn, scale, base, norm_eps, hc_eps), _ = op_cases()["mhc_head"]
    xf = x.flatten(2).double()
    mixes = (xf @ fn.double().T) / torch.sqrt((xf * xf).mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mixes * scale.double() + base.double()) + hc_eps
    ref = (pre[..., None] * x.double()).sum(-2)
    assert_within_contract("mhc_head", ops.mhc_head(x, fn, scale, base, norm_eps, hc_eps), ref)


# -- MoE ----------------------------------------------------------------------------------------------------------
def sqrt_softplus(v: float) -> float:
    return math.sqrt(max(v, 0.0) + math.log1p(math.exp(-abs(v))))


def test_moe_gate_on_a_hand_worked_two_token_four_expert_case():
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=BF16)
    weight = torch.tensor([[0.5, 0.25], [-1.0, 1.0], [2.0, 0.0], [0.0, -3.0]])
    logits = [[1.0, 1.0, 2.0, -6.0], [-0.375, 1.5, -2.0, -1.5]]          # exact in fp32
    a = [[sqrt_softplus(v) for v in row] for row in logits]

    def expected(experts: list[list[int]], route_scale: float) -> torch.Tensor:
        weights = [[a[t][e] / sum(a[t][j] for j in row) * route_scale for e in row] for t, row in enumerate(experts)]
        return torch.tensor(weights, dtype=torch.float64)

    # No bias: token 0 has a(2) first, then the tie a(0) == a(1) goes to expert 0; token 1: experts 1 then 0.
    w, e = ops.moe_gate(x, weight, None, None, 2, 1.5)
    assert e.tolist() == [[2, 0], [1, 0]]
    torch.testing.assert_close(w.double(), expected([[2, 0], [1, 0]], 1.5), atol=0, rtol=2e-6)
    # A bias of 2 on expert 3 moves it first for both tokens; the weights still come from a, not a + bias.
    w, e = ops.moe_gate(x, weight, torch.tensor([0.0, 0.0, 0.0, 2.0]), None, 2, 1.5)
    assert e.tolist() == [[3, 2], [3, 1]]
    torch.testing.assert_close(w.double(), expected([[3, 2], [3, 1]], 1.5), atol=0, rtol=2e-6)
    hashed = torch.tensor([[3, 1], [0, 2]])
    w, e = ops.moe_gate(x, weight, None, hashed, 2, 2.5)
    assert torch.equal(e, hashed)
    torch.testing.assert_close(w.double(), expected(hashed.tolist(), 2.5), atol=0, rtol=2e-6)


def test_moe_dispatch_then_combine_round_trips_every_slot_in_slot_order():
    t, k, experts = 6, 2, torch.randint(0, 4, (6, 2), generator=gen(50))
    order, counts = ops.moe_dispatch(experts, 4)
    flat = experts.flatten()
    assert counts.tolist() == [int((flat == e).sum()) for e in range(4)]
    assert torch.equal(flat[order], torch.sort(flat).values)
    for e in range(4):
        assert torch.equal(order[flat[order] == e], torch.nonzero(flat == e).flatten())   # stable
    x, shared = randn(t, 32, seed=51, dtype=BF16), randn(t, 32, seed=52, dtype=BF16)
    slot_scale = 2.0 ** (order % k)[:, None]                        # slot 0 -> x, slot 1 -> 2x (exact)
    expert_out = (x[order // k].float() * slot_scale).to(BF16)
    expected = ((x.float() + 2 * x.float()) + shared.float()).to(BF16)
    assert same_bits(ops.moe_combine(expert_out, order, k, shared), expected)


def test_swiglu_clamps_then_applies_silu_and_route_weight():
    g, u = randn(5, 40, seed=35, dtype=BF16, scale=8), randn(5, 40, seed=36, dtype=BF16, scale=8)
    rw = torch.rand(5, generator=gen(37))
    gd, ud = g.double().clamp(max=10), u.double().clamp(-10, 10)
    ref = torch.nn.functional.silu(gd) * ud * rw.double()[:, None]
    assert_within_contract("swiglu", ops.swiglu(g, u, 10.0, rw), ref)
    unclamped = torch.nn.functional.silu(g.double()) * u.double()
    assert_within_contract("swiglu", ops.swiglu(g, u, 0.0, None), unclamped)


# -- sampling -----------------------------------------------------------------------------------------------------
def draw(logits, seed=7, temperature=1.0, top_p=1.0, request=None, position=None):
    b = logits.shape[0]
    request = torch.arange(b) if request is None else request
    position = torch.zeros(b, dtype=torch.int64) if position is None else position
    return ops.sample(logits, torch.full((b,), temperature), torch.full((b,), top_p), seed, request, position)


def test_sample_at_temperature_zero_is_argmax_with_ties_to_the_lower_id():
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0], [-1.0, -3.0, -0.5, -0.5]])
    assert draw(logits, temperature=0.0).tolist() == [1, 0, 2]


def test_sample_is_a_deterministic_function_of_seed_request_and_position():
    logits = torch.zeros(16, 1000)
    tokens = draw(logits)
    assert torch.equal(tokens, draw(logits))
    assert len(set(tokens.tolist())) >= 12                                  # different requests, different draws
    assert not torch.equal(tokens, draw(logits, position=torch.ones(16, dtype=torch.int64)))
    assert not torch.equal(tokens, draw(logits, seed=8))
    same_key = draw(logits, request=torch.zeros(16, dtype=torch.int64))
    assert len(set(same_key.tolist())) == 1
    assert draw(logits[:1], request=torch.tensor([5])).item() == tokens[5].item()   # batch-independent


def test_sample_top_p_keeps_the_smallest_set_reaching_the_mass_and_samples_it_by_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(4000, 3)
    counts = torch.bincount(draw(logits, top_p=0.6), minlength=3).double() / 4000
    assert counts[2] == 0
    assert abs(counts[0].item() - 0.625) < 0.04                               # 0.5 / 0.8 within the kept set
    all_kept = torch.bincount(draw(logits), minlength=3).double() / 4000
    assert (all_kept - torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)).abs().max() < 0.04
    assert draw(logits[:50], top_p=0.1).tolist() == [0] * 50


# -- the same bits on every device --------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_every_op_gives_the_same_bits_on_cpu_and_cuda():
    for case, (name, args, _) in op_cases().items():
        cpu = as_tuple(getattr(ops, name)(*args))
        cuda = as_tuple(getattr(ops, name)(*(to_device(a, "cuda") for a in args)))
        assert same_bits(cpu, cuda), case
