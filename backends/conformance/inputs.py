"""The inputs of the conformance checks: one catalogue of op cases and the whole-model prompts, every value drawn from
the counter-based generator by a named seed, so every machine builds the same bits.

A case's `build(row_seeds)` returns the arguments of a batch whose row i is made from row_seeds[i] alone (and from
that seed plus the `Seed.ROW_*` offsets for its further operands); arguments shared by every row come from the fixed
seeds. So one row can be rebuilt alone or inside any batch, which is what the batch-invariance checks need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dsv4.backends.canonical.primitives import counter_uniform
from dsv4.backends.contracts import FP4_BLOCK, KV_FP8_BLOCK
from dsv4.cache import PagedRows
from dsv4.formats import fake_quant, quantize_weight_fp4, quantize_weight_fp8


class Seed:
    """Every seed of the conformance inputs, named by what it makes. The values are part of the golden digests
    (backends/golden/digests.json): changing one changes them. Unrelated inputs may share a value."""
    # the rows of an op check: one batch, the rows checked alone and inside batches, and the batches' other rows
    CHECK_ROWS = (101, 202, 303)
    BATCH_TARGETS = (4242, 4243, 4244)
    BATCH_FILLER, BATCH_FILLER_STRIDE = 7000, 13        # row i of the batch of n: 7000 + 13 * n + i
    # a row's further operands: its seed plus these
    ROW_OPERAND_2, ROW_OPERAND_3, ROW_OPERAND_4 = 1, 2, 3
    ROW_BLOCK_TABLE = 4
    ROW_FRESH_KV = 5
    ROW_EMPTY_SLOTS = 9
    # inputs shared by every row
    NORM_WEIGHT = 1
    LINEAR_BF16_WEIGHT, LINEAR_FP32_WEIGHT, LINEAR_GROUPED_WEIGHT = 2, 3, 4
    FP8_WEIGHT, FP4_WEIGHT = 11, 12
    EXPERT_WEIGHTS = 20                                  # expert e: 20 + e
    ATTENTION_KV, HCA_KV, INDEX_KEYS = 1, 2, 3
    SINK = 5
    MHC_PRE_FN, MHC_PRE_SCALE, MHC_PRE_BASE = 6, 7, 8
    MHC_HEAD_FN, MHC_HEAD_SCALE, MHC_HEAD_BASE = 9, 10, 13
    GATE_WEIGHT, GATE_BIAS = 14, 15
    SAMPLE = 1234                                        # the sampler's own seed
    # the device probe's operands
    PROBE_A, PROBE_B = 31, 32
    PROBE_X, PROBE_Y, PROBE_Z = 33, 34, 35


def uniform(seed: int, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """fp32 values in (low, high) from the counter-based generator: the same on every machine."""
    u = counter_uniform(seed, torch.tensor([0]), torch.tensor([0]), max(1, math.prod(shape)), "cpu")[0]
    return (u[:math.prod(shape)] * (high - low) + low).view(shape)


def rows(seeds: list[int], shape: tuple[int, ...], low=-1.0, high=1.0, dtype=torch.float32) -> torch.Tensor:
    """A batch [len(seeds), *shape]: row i drawn from seeds[i] alone."""
    return torch.stack([uniform(s, shape, low, high) for s in seeds]).to(dtype)


def offset(seeds: list[int], by: int) -> list[int]:
    """The seeds of each row's further operand `by` (one of the Seed.ROW_* offsets)."""
    return [s + by for s in seeds]


@dataclass
class OpCase:
    """Sample inputs for one op: `build(row_seeds)` returns the args of a batch whose row i is made from row_seeds[i]
    alone (and shared args made from fixed seeds). `row_outputs` says whether output dim 0 is that row;
    `row_position(seeds, target)` where the row of seed `target` lands in the output (rows may be reordered)."""
    name: str
    op: str
    build: Callable[[list[int]], tuple]
    row_outputs: bool = True
    row_position: Callable[[list[int], int], int] = lambda seeds, target: seeds.index(target)


N_EXPERTS = 4            # grouped_quant_linear: the expert of a row is its seed % N_EXPERTS


def _by_expert(seeds: list[int]) -> list[int]:
    """The order grouped_quant_linear's rows arrive in: sorted by their expert (stably), as the dispatch hands them."""
    return sorted(range(len(seeds)), key=lambda i: seeds[i] % N_EXPERTS)


def _op_cases() -> list[OpCase]:
    bf = torch.bfloat16
    w8, s8 = quantize_weight_fp8(uniform(Seed.FP8_WEIGHT, (192, 256), -0.1, 0.1))
    w4, s4 = quantize_weight_fp4(uniform(Seed.FP4_WEIGHT, (128, 256), -0.1, 0.1))
    ew4 = [quantize_weight_fp4(uniform(Seed.EXPERT_WEIGHTS + e, (64, 256), -0.1, 0.1)) for e in range(N_EXPERTS)]
    gw, gs = torch.stack([w for w, _ in ew4]), torch.stack([s for _, s in ew4])

    def angles(seeds):
        a = rows(seeds, (1, 32), 0, 6.283).double()
        return a.cos().float(), a.sin().float()

    def grouped(seeds):
        order = _by_expert(seeds)
        counts = torch.bincount(torch.tensor([seeds[i] % N_EXPERTS for i in order], dtype=torch.int64),
                                minlength=N_EXPERTS)
        return rows([seeds[i] for i in order], (256,), -3, 3, bf), counts, gw, gs

    # Paged storage shared by every row of a batch, as the cache is: values on the storage grid (FP8 KV with a bf16
    # RoPE tail, FP4 indexer keys), rows addressed through per-sequence block tables.
    def fp8_kv(seed, n):   # 64 FP8 dims, then 64 RoPE dims kept in bf16
        v = uniform(seed, (n, 128), -2, 2).to(bf)
        return torch.cat([fake_quant(v[:, :64], "fp8", KV_FP8_BLOCK), v[:, 64:]], dim=-1)

    attn_kv = PagedRows.holding(fp8_kv(Seed.ATTENTION_KV, 80), "fp8", KV_FP8_BLOCK, 64)
    hca_kv = PagedRows.holding(fp8_kv(Seed.HCA_KV, 48), "fp8", KV_FP8_BLOCK, 64, pool_base=16, entries_per_block=2)
    index_keys = PagedRows.holding(fake_quant(uniform(Seed.INDEX_KEYS, (64, 128), -1, 1).to(bf), "fp4", FP4_BLOCK),
                                   "fp4", FP4_BLOCK, 0, entries_per_block=8)

    def block_tables(seeds, n_blocks):   # a permutation of the pool's blocks per sequence
        return torch.stack([torch.argsort(uniform(s, (n_blocks,)), stable=True)
                            for s in offset(seeds, Seed.ROW_BLOCK_TABLE)]).int()

    def indexer(seeds):
        n_visible = torch.tensor([[3 + s % 37] for s in seeds])
        return (rows(seeds, (1, 4, 128), -1, 1, bf), rows(offset(seeds, Seed.ROW_OPERAND_2), (1, 4), 0, 1),
                index_keys, block_tables(seeds, 8), n_visible, 8)

    def fresh(seeds):
        return torch.stack([fp8_kv(s, 1) for s in offset(seeds, Seed.ROW_FRESH_KV)])

    def attention_idx(seeds, n_keys, width, fresh_row):   # this step's row first, then stored rows and empty slots
        idx = (rows(seeds, (1, width), 0, n_keys)).long()
        idx = torch.where(rows(offset(seeds, Seed.ROW_EMPTY_SLOTS), (1, width), 0, 1) < 0.2, -1, idx)
        return torch.cat([torch.full((len(seeds), 1, 1), fresh_row, dtype=torch.long), idx], -1)

    def experts(seeds, k=2, e=8):   # k distinct experts per row, from the portable generator
        return torch.stack([torch.argsort(uniform(s, (e,)), stable=True)[:k] for s in seeds])

    def second(s, *args, **kw):
        return rows(offset(s, Seed.ROW_OPERAND_2), *args, **kw)

    def third(s, *args, **kw):
        return rows(offset(s, Seed.ROW_OPERAND_3), *args, **kw)

    def fourth(s, *args, **kw):
        return rows(offset(s, Seed.ROW_OPERAND_4), *args, **kw)

    sink = uniform(Seed.SINK, (4,), -1, 1)
    norm_weight = uniform(Seed.NORM_WEIGHT, (256,), 0.5, 1.5)
    gate_weight = uniform(Seed.GATE_WEIGHT, (8, 256), -.1, .1)
    return [
        OpCase("rms_norm", "rms_norm", lambda s: (rows(s, (256,), -3, 3, bf), norm_weight, 1e-6)),
        OpCase("rms_norm_unweighted_fp32", "rms_norm", lambda s: (rows(s, (256,), -3, 3), None, 1e-6)),
        OpCase("rope", "rope", lambda s: (rows(s, (4, 128), -2, 2, bf), *angles(s), False)),
        OpCase("rope_inverse", "rope", lambda s: (rows(s, (4, 128), -2, 2, bf), *angles(s), True)),
        OpCase("hadamard", "hadamard", lambda s: (rows(s, (2, 128), -2, 2, bf),)),
        OpCase("fake_quant_fp8", "fake_quant", lambda s: (rows(s, (448,), -5, 5, bf), "fp8", 64)),
        OpCase("fake_quant_fp4", "fake_quant", lambda s: (rows(s, (128,), -5, 5, bf), "fp4", 32)),
        OpCase("encode_rows_fp8", "encode_rows",
               lambda s: (fake_quant(rows(s, (448,), -5, 5, bf), "fp8", KV_FP8_BLOCK), "fp8", KV_FP8_BLOCK)),
        OpCase("encode_rows_fp4", "encode_rows",
               lambda s: (fake_quant(rows(s, (128,), -5, 5, bf), "fp4", FP4_BLOCK), "fp4", FP4_BLOCK)),
        OpCase("linear_bf16", "linear", lambda s: (
            rows(s, (256,), -1, 1, bf), uniform(Seed.LINEAR_BF16_WEIGHT, (96, 256), -.1, .1).to(bf))),
        OpCase("linear_fp32", "linear", lambda s: (
            rows(s, (256,), -1, 1, bf).float(), uniform(Seed.LINEAR_FP32_WEIGHT, (40, 256), -.1, .1))),
        OpCase("linear_grouped", "linear", lambda s: (
            rows(s, (2, 128), -1, 1, bf), uniform(Seed.LINEAR_GROUPED_WEIGHT, (2, 64, 128), -.1, .1).to(bf))),
        OpCase("quant_linear_fp8", "quant_linear", lambda s: (rows(s, (256,), -3, 3, bf), w8, s8)),
        OpCase("quant_linear_fp4", "quant_linear", lambda s: (rows(s, (256,), -3, 3, bf), w4, s4)),
        OpCase("grouped_quant_linear_fp4", "grouped_quant_linear", grouped,
               row_position=lambda seeds, target: _by_expert(seeds).index(seeds.index(target))),
        OpCase("compress_pool", "compress_pool", lambda s: (
            rows(s, (8, 128), -2, 2),
            torch.where(torch.arange(8)[None, :, None] < torch.tensor([x % 3 for x in s])[:, None, None],
                        float("-inf"), second(s, (8, 128), -3, 3)))),
        OpCase("indexer_topk", "indexer_topk", indexer),
        OpCase("sparse_attention", "sparse_attention", lambda s: (
            rows(s, (1, 4, 128), -1, 1, bf), attn_kv, fresh(s), attention_idx(s, 80, 23, 80), sink, 128 ** -0.5)),
        OpCase("hca_attention", "hca_attention", lambda s: (
            rows(s, (1, 4, 128), -1, 1, bf), hca_kv, fresh(s), attention_idx(s, 16, 15, 48), block_tables(s, 16),
            torch.tensor([[x % 32] for x in s]), sink, 128 ** -0.5)),
        OpCase("mhc_pre", "mhc_pre", lambda s: (
            rows(s, (1, 4, 256), -2, 2, bf), uniform(Seed.MHC_PRE_FN, (24, 1024), -.05, .05),
            uniform(Seed.MHC_PRE_SCALE, (3,), 0.5, 1.5), uniform(Seed.MHC_PRE_BASE, (24,), -1, 1), 1e-6, 1e-6, 20)),
        OpCase("mhc_post", "mhc_post", lambda s: (
            rows(s, (1, 256), -2, 2, bf), second(s, (1, 4, 256), -2, 2, bf), third(s, (1, 4), 0, 2),
            fourth(s, (1, 4, 4), 0, 1))),
        OpCase("mhc_head", "mhc_head", lambda s: (
            rows(s, (1, 4, 256), -2, 2, bf), uniform(Seed.MHC_HEAD_FN, (4, 1024), -.05, .05),
            uniform(Seed.MHC_HEAD_SCALE, (1,), 0.5, 1.5), uniform(Seed.MHC_HEAD_BASE, (4,), -1, 1), 1e-6, 1e-6)),
        OpCase("moe_gate_scored", "moe_gate", lambda s: (
            rows(s, (256,), -2, 2, bf), gate_weight, uniform(Seed.GATE_BIAS, (8,), -.1, .1), None, 2, 1.5)),
        OpCase("moe_gate_hashed", "moe_gate", lambda s: (
            rows(s, (256,), -2, 2, bf), gate_weight, None, experts(s), 2, 1.5)),
        OpCase("moe_dispatch", "moe_dispatch", lambda s: (experts(s), 8), row_outputs=False),
        OpCase("swiglu", "swiglu", lambda s: (
            rows(s, (128,), -14, 14, bf), second(s, (128,), -14, 14, bf), 10.0, third(s, (), 0, 1))),
        OpCase("moe_combine", "moe_combine", lambda s: (
            rows(s, (2, 256), -2, 2, bf).flatten(0, 1), torch.arange(2 * len(s)), 2, second(s, (256,), -2, 2, bf))),
        # One process: the collective is checked across processes by tests/test_expert_parallel.py.
        OpCase("ep_combine", "ep_combine", lambda s: (
            rows(s, (2, 256), -2, 2, bf).flatten(0, 1), torch.arange(2 * len(s)), torch.tensor([2 * len(s)]), 2,
            second(s, (256,), -2, 2, bf), None)),
        OpCase("sample", "sample", lambda s: (
            rows(s, (260,), -4, 4), torch.tensor([(0.0, 0.7, 1.3)[x % 3] for x in s]),
            torch.tensor([(1.0, 0.9, 0.5)[x % 3] for x in s]), Seed.SAMPLE, torch.tensor(s),
            torch.tensor([x * 7 for x in s]))),
    ]


OP_CASES: dict[str, OpCase] = {case.name: case for case in _op_cases()}

# Whole-model checks: three prompts of different lengths (BOS 256 then bytes, for the byte-level presets).
MODEL_PROMPTS = ((256, *b"def add(a, b):\n    return a + b\n"), (256, *b"import os\nprint(os.getcwd())"),
                 (256, *b"x"))


def to_device(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, (torch.Tensor, PagedRows)) else a for a in args)
