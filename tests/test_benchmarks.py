"""The benchmarks' inputs are valid calls of the ops they time, and `dsv4 bench` refuses to run without a GPU."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from dsv4.backends.canonical import ops as canonical
from dsv4.benchmarks import layer, ops, plot
from dsv4.backends.registry import default_registry
from dsv4.cache import KVCache
from dsv4.cli import main
from dsv4.config import preset
from dsv4.model import rope_table


@pytest.mark.parametrize("phase,size", [("decode", 3), ("prefill", 40)])
def test_every_op_benchmark_case_is_a_valid_call_of_its_reference_op(phase, size):
    seen = set()
    for case in ops.cases(preset("tiny"), phase, size, 300, torch.device("cpu")):
        getattr(canonical, case.op)(*case.args)
        assert case.bytes > 0
        seen.add(case.op)
    assert {"quant_linear", "grouped_quant_linear", "sparse_attention", "hca_attention", "indexer_topk"} <= seen


@pytest.mark.parametrize("kind", sorted(layer.LAYER_KINDS))
def test_layer_benchmark_builds_a_random_layer_that_runs_a_decode_step(kind):
    table = default_registry().resolve("cpu", "fast")
    config = layer.layer_config("tiny", kind, 2, 300)
    block = layer.random_block(config, table, torch.device("cpu"))
    cache = KVCache(config, 2, "cpu")
    step = cache.step([200, 200], [0, 1], 1)
    h = torch.randn(2, 1, config.hc_mult, config.dim).bfloat16()
    out = block(h, torch.zeros(2, 1, dtype=torch.int64), step, rope_table(config, kind != "window"))
    assert out.shape == h.shape and torch.isfinite(out.float()).all()
    assert 0 < layer.weight_bytes(block, config, 1) < layer.weight_bytes(block, config, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("what", ["ops", "layer"])
def test_bench_without_a_gpu_is_one_clear_line(what):
    result = CliRunner().invoke(main, ["bench", what, "--device", "cpu"])
    assert result.exit_code != 0
    assert "needs --device cuda" in result.output and "Traceback" not in result.output


def test_layer_plot_draws_one_line_per_level_and_the_floor_for_each_layer_kind():
    import xml.etree.ElementTree as ET

    rows = [{"layer": kind, "phase": "decode", "size": b, "level": level, "wall_us": 2.0 * b, "gpu_us": 10.0 * b + i,
             "floor_us": 5.0 * b} for kind in ("csa", "hca") for b in (1, 16, 64)
            for i, level in enumerate(("fast", "batch-invariant", "exact"))]
    result = {"rows": rows, "preset": "v4-flash", "device": "GPU", "torch": "t", "triton": "tr", "date": "d",
              "context": 8192}
    svg = ET.fromstring(plot.layer_decode_svg(result))
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert sorted(line.find("{http://www.w3.org/2000/svg}title").text for line in lines) == sorted(
        ["fast", "batch-invariant", "exact", "floor"] * 2)
    assert all(len(line.get("points").split()) == 3 for line in lines)


def test_model_benchmark_decodes_a_random_stack_and_counts_the_bytes_a_step_reads():
    from dsv4.benchmarks import model as bench_model
    from dsv4.benchmarks.layer import randomise
    from dsv4.cache import blocks_for
    from dsv4.engine import Engine
    from dsv4.model import Transformer

    config = bench_model.stack_config("tiny", 3, 2, 300)
    assert config.n_layers == 3 and config.n_mtp_layers == 0 and config.max_seq_len >= 300
    with torch.device("cpu"):
        stack = Transformer(config, default_registry().resolve("cpu", "fast"))
    randomise(stack, config)
    # a cache sized as run() sizes it, for the largest point alone: a batch-1 long context after a batch of two
    # fits only if the batch's sequences gave their blocks back
    points = [(2, 200), (1, 280)]
    blocks = max(b * blocks_for(c + bench_model.DECODE_STEPS + 2) for b, c in points) + 1
    engine = Engine(stack, torch.device("cpu"), max_batch=2, cache_blocks=blocks)
    for batch, context in points:
        assert bench_model._decode_seconds(engine, batch, context) > 0
    more_context = bench_model.step_bytes(stack, 1, 280) - bench_model.step_bytes(stack, 1, 40)
    more_batch = bench_model.step_bytes(stack, 2, 40) - bench_model.step_bytes(stack, 1, 40)
    assert more_context > 0 and more_batch > 0
