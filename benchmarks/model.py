"""End-to-end benchmark (`dsv4 bench model`): a stack of N layers of a preset (V4-Flash by default) with random
weights on one GPU, run by the engine as a user's generation would be: decode steps replayed as CUDA graphs, each
step covering every layer, the head and sampling.

For every level, batch size and context, `batch` sequences already hold `context` positions (their cache blocks
reserved and filled with random codes), and decode steps are timed on the wall clock, the token read back to the
host each step as `dsv4 run` does: time per output token (TPOT) and tokens/s. Each is compared with its floor: the
bytes one step must read (every non-routed weight, the routed experts `batch` tokens hit in expectation, the head,
plus the cached rows its attention and indexer read at that context) over the HBM bandwidth measured in the same
run. Prefill is timed as tokens/s of one prompt through `Engine.prefill` (eager).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from dsv4.backends.contracts import FP4_BLOCK
from dsv4.backends.levels import Level
from dsv4.benchmarks.layer import fill_cache, randomise, use_ops
from dsv4.benchmarks.ops import kv_row_bytes
from dsv4.benchmarks.timing import level_tables, limits
from dsv4.cache import blocks_for
from dsv4.config import CSA_RATIO, ModelConfig, preset
from dsv4.engine import Engine, Request
from dsv4.model import Transformer

DECODE_STEPS = 8      # timed decode steps per point, after one warm-up step (which captures the graph)


@dataclass
class Row:
    phase: str              # "decode" or "prefill"
    level: str
    batch: int
    context: int            # decode: positions each sequence holds; prefill: the prompt length
    tpot_us: float          # decode: wall time of one step; prefill: wall time of the prefill
    tokens_per_s: float
    floor_us: float         # decode: bytes read by one step / HBM; prefill: 0


def stack_config(preset_name: str, layers: int, batch: int, context: int) -> ModelConfig:
    """The preset's first `layers` layers (no MTP), sized for `batch` sequences of `context` positions."""
    c = preset(preset_name)
    return dataclasses.replace(c, n_layers=layers, n_mtp_layers=0, n_hash_layers=min(c.n_hash_layers, layers),
                               compress_ratios=c.compress_ratios[:layers], max_batch_size=batch,
                               max_seq_len=128 * -(-(context + DECODE_STEPS + 2) // 128))


def step_bytes(model: Transformer, batch: int, context: int) -> int:
    """Bytes one decode step reads: every parameter except the routed experts, the experts `batch` tokens hit in
    expectation under uniform routing, and per sequence the cached rows attention reads (window + top-k or every
    HCA entry) and every visible indexer key."""
    c = model.config
    routed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) - routed
    E, k = c.n_routed_experts, c.n_activated_experts
    hit = E * (1 - (1 - k / E) ** batch)
    cache = 0
    for ratio in c.compress_ratios[:c.n_layers]:
        rows = c.window_size
        if ratio == CSA_RATIO:
            rows += min(c.index_topk, context // ratio)
            cache += context // ratio * (c.index_head_dim // 2 + c.index_head_dim // FP4_BLOCK * 4)
        elif ratio:
            rows += context // ratio
        cache += rows * kv_row_bytes(c)
    return rest + int(routed * hit / E) + batch * cache


def _decode_seconds(engine: Engine, batch: int, context: int) -> float:
    """Median wall seconds of a decode step of `batch` sequences at position `context`."""
    slots = list(range(batch))
    for slot in range(engine.max_batch):      # every slot: an earlier, larger batch's sequences give back their blocks
        engine.cache.reset(slot)
    for slot in slots:
        engine.cache.reserve(slot, context + DECODE_STEPS + 1)
    fill_cache(engine.cache)
    requests = [Request([0], request_id=i) for i in slots]
    times = []
    for i in range(DECODE_STEPS + 1):
        t0 = time.perf_counter()
        engine.decode(slots, [1] * batch, [context + i] * batch, requests)     # reads the tokens back: a sync
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[DECODE_STEPS // 2]


def run(preset_name: str, layers: int, batches: tuple[int, ...], contexts: tuple[int, ...], prefill: int,
        levels: tuple[Level, ...], device: str = "cuda", long_contexts: tuple[int, ...] = (),
        progress: Callable[[str], None] = lambda _: None) -> dict:
    """Decode at every (batch, context) and at batch 1 for each long context; one prefill per level."""
    dev = torch.device(device)
    tables = level_tables(dev, levels)
    hw = limits(dev)
    longest = max(contexts + long_contexts + (prefill,))
    config = stack_config(preset_name, layers, max(batches), longest)
    with torch.device(dev):
        model = Transformer(config, tables[levels[0]])
    randomise(model, config)
    points = [(b, c) for c in contexts for b in batches] + [(1, c) for c in long_contexts]
    blocks = max(b * blocks_for(c + DECODE_STEPS + 2) for b, c in points + [(1, prefill)]) + 1
    rows: list[Row] = []
    for level, table in tables.items():
        use_ops(model, table)
        engine = Engine(model, dev, max_batch=max(batches), cache_blocks=blocks)
        for batch, context in points:
            progress(f"decode {level.label} batch {batch} context {context}")
            seconds = _decode_seconds(engine, batch, context)
            floor = step_bytes(model, batch, context) / hw["hbm_bytes_per_s"] * 1e6
            rows.append(Row("decode", level.label, batch, context, seconds * 1e6, batch / seconds, floor))
        if prefill:
            progress(f"prefill {level.label} {prefill} tokens")
            prompt = torch.randint(0, config.vocab_size, (prefill,)).tolist()
            engine.prefill(prompt, 0)
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            engine.prefill(prompt, 0)
            torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            rows.append(Row("prefill", level.label, 1, prefill, seconds * 1e6, prefill / seconds, 0.0))
        del engine
        torch.cuda.empty_cache()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**hw, "preset": preset_name, "layers": layers, "weight_bytes": weights,
            "ratios": list(config.compress_ratios), "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"dsv4 bench model on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"{result['date']}): {result['layers']} {result['preset']} layers + head, "
             f"{result['weight_bytes'] / 2 ** 30:.1f} GiB of weights",
             f"HBM {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s measured now ({result['hbm_method']}); floor = bytes "
             f"one step reads (weights, experts hit, cached rows) / HBM",
             f"{'phase':7} {'level':16} {'batch':>5} {'context':>8} {'TPOT us':>10} {'tok/s':>10} {'floor us':>9} "
             f"{'TPOT/floor':>10} {'vs fast':>7}"]
    fast = {(r["phase"], r["batch"], r["context"]): r for r in result["rows"] if r["level"] == "fast"}
    for r in result["rows"]:
        f = fast.get((r["phase"], r["batch"], r["context"]))
        over = f"{r['tpot_us'] / r['floor_us']:.2f}" if r["floor_us"] else ""
        vs_fast = f"{r['tpot_us'] / f['tpot_us']:.2f}" if f else ""
        lines.append(f"{r['phase']:7} {r['level']:16} {r['batch']:>5} {r['context']:>8} {r['tpot_us']:10.0f} "
                     f"{r['tokens_per_s']:10.1f} {r['floor_us']:9.0f} {over:>10} {vs_fast:>7}")
    return "\n".join(lines)
