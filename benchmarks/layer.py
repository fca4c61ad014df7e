"""Per-layer benchmark (`dsv4 bench layer`): one DeepSeek-V4 block (mHC + attention + MoE) at the real dimensions
of a preset, random weights on one GPU, decode steps and prefills at every determinism level.

A decode step is one new token for each of `batch` sequences that already hold `context` tokens (the window ring,
compressed entries and indexer keys are filled with random values); a prefill is one prompt of `length` tokens. Each
is timed three ways: eager wall time per step (CUDA events around the step, host launch work included), wall time
of the step replayed as a CUDA graph (how the engine runs a decode step), and GPU busy time (the sum of the step's
kernel times, from the profiler, which also names the costliest kernels). The decode step is reported against its weight-read floor: the bytes of every weight the step
must read (all non-routed weights plus the routed experts that `batch` tokens are expected to hit under uniform
routing), divided by the HBM bandwidth measured in the same run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from dsv4.backends.levels import Level
from dsv4.backends.registry import OpTable
from dsv4.benchmarks.timing import level_tables, limits, median_us
from dsv4.cache import KVCache
from dsv4.config import CSA_RATIO, ModelConfig, preset
from dsv4.model import Block, rope_table

LAYER_KINDS = ("csa", "hca", "window")


def kind_ratio(config: ModelConfig, kind: str) -> int:
    """The compress ratio of a `kind` layer of `config`: CSA's, the preset's HCA ratio (its largest) or none."""
    return {"csa": CSA_RATIO, "hca": max(config.compress_ratios), "window": 0}[kind]


@dataclass
class Row:
    layer: str
    phase: str
    size: int               # decode: batch; prefill: prompt length
    level: str
    wall_us: float          # eager, host work included
    graph_us: float | None  # replayed as a CUDA graph (None: the step could not be captured)
    gpu_us: float
    floor_us: float         # decode: weight-read floor; prefill: 0 (compute-bound)
    kernels: int = 0        # kernel launches in one step
    top: list = field(default_factory=list)   # the costliest kernels: [name, microseconds, calls]


def layer_config(preset_name: str, kind: str, batch: int, tokens: int) -> ModelConfig:
    """The preset with a single layer of the given kind, a cache for `batch` sequences of `tokens` positions."""
    c = preset(preset_name)
    return dataclasses.replace(c, n_layers=1, n_mtp_layers=0, n_hash_layers=0,
                               compress_ratios=(kind_ratio(c, kind),), max_batch_size=batch,
                               max_seq_len=128 * math.ceil((tokens + 1) / 128))


def random_block(config: ModelConfig, ops: OpTable, device: torch.device) -> Block:
    """Block 0 built on the device with random weights in sensible ranges (timing does not depend on the values)."""
    with torch.device(device):
        block = Block(ops, config, 0)
    randomise(block, config)
    return block


@torch.no_grad()
def randomise(module: torch.nn.Module, config: ModelConfig) -> None:
    """Fill every parameter with random values of its format: valid FP8/FP4 codes, power-of-two scales, unit norms,
    expert ids for hash routing, small Gaussian weights elsewhere."""
    for name, p in module.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            p.copy_((torch.randn(p.shape, device=p.device) * 0.5).to(torch.float8_e4m3fn))
        elif p.dtype == torch.int8:                       # packed FP4 codes: every byte is valid
            p.copy_(torch.randint(-128, 128, p.shape, device=p.device, dtype=torch.int8))
        elif p.dtype == torch.int64:                      # hash routing: token id -> expert ids
            p.copy_(torch.randint(0, config.n_routed_experts, p.shape, device=p.device))
        elif name.endswith("scale") and p.dim() == 2:     # quantisation scales: powers of two
            p.fill_(2.0 ** -7)
        elif name.endswith(("norm.weight", "hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
            p.fill_(1.0)
        elif name.endswith(("bias", "base", "attn_sink", "ape")):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, device=p.device) * p.shape[-1] ** -0.5)


def use_ops(model: torch.nn.Module, ops: OpTable) -> None:
    """Point every module of a block or model at another op table (another determinism level)."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops


def weight_bytes(block: Block, config: ModelConfig, batch: int) -> int:
    """Bytes of the weights one decode step reads: everything but the routed experts, plus the experts that `batch`
    tokens hit in expectation under uniform routing."""
    experts = block.ffn.experts
    routed = sum(p.numel() * p.element_size() for p in experts.parameters())
    rest = sum(p.numel() * p.element_size() for p in block.parameters()) - routed
    E, k = config.n_routed_experts, config.n_activated_experts
    hit = E * (1 - (1 - k / E) ** batch)
    return rest + int(routed * hit / E)


def fill_cache(cache: KVCache) -> None:
    """Random stored rows (window rings and compressed entries) in every layer."""
    for layer in cache.layers:
        stores = [layer.kv] + ([layer.indexer.entries] if layer.indexer is not None else [])
        for store in stores:
            store.codes.copy_((torch.randn(store.codes.shape, device=store.codes.device)).to(store.codes.dtype)
                              if store.fmt == "fp8" else torch.randint_like(store.codes, 0, 256))
            store.tail.normal_()


TOP_KERNELS = 12


def _time_step(step: Callable[[], object], iters: int, graph: bool) -> tuple[float, float | None, float, int, list]:
    """(median eager wall us, median graph-replay us or None, GPU busy us, kernel launches, costliest kernels)."""
    step()
    torch.cuda.synchronize()
    wall = median_us(step, iters)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events)
    top = [[e.key[:80], round(e.self_device_time_total, 1), e.count]
           for e in sorted(events, key=lambda e: -e.self_device_time_total)[:TOP_KERNELS]]
    return wall, _graph_us(step, iters) if graph else None, busy, launches, top


def _graph_us(step: Callable[[], object], iters: int) -> float | None:
    """Median microseconds of the step replayed as a CUDA graph, or None when it cannot be captured."""
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            step()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    g.replay()
    torch.cuda.synchronize()
    return median_us(g.replay, iters)


def run(preset_name: str, kinds: tuple[str, ...], batches: tuple[int, ...], prefills: tuple[int, ...],
        context: int, levels: tuple[Level, ...], device: str = "cuda", exact_prefill_max: int = 4096,
        progress: Callable[[str], None] = lambda _: None) -> dict:
    dev = torch.device(device)
    tables = level_tables(dev, levels)
    hw = limits(dev)
    rows: list[Row] = []
    for kind in kinds:
        big = max([context + 1] + list(prefills))
        config = layer_config(preset_name, kind, max(batches + (1,)), big)
        block = random_block(config, tables[levels[0]], dev)
        rope = tuple(t.to(dev) for t in rope_table(config, kind != "window"))
        for phase, size in [("decode", n) for n in batches] + [("prefill", n) for n in prefills]:
            b, s = (size, 1) if phase == "decode" else (1, size)
            cache = KVCache(config, b, dev)
            fill_cache(cache)
            start = context if phase == "decode" else 0
            step = cache.step([start] * b, list(range(b)), s)
            h = torch.randn(b, s, config.hc_mult, config.dim, device=dev).bfloat16()
            tokens = torch.randint(0, config.vocab_size, (b, s), device=dev)
            floor = weight_bytes(block, config, b) / hw["hbm_bytes_per_s"] * 1e6 if phase == "decode" else 0.0
            for level, table in tables.items():
                if phase == "prefill" and level == Level.EXACT and size > exact_prefill_max:
                    continue
                progress(f"{kind} layer {phase} {size} {level.label}")
                use_ops(block, table)
                with torch.no_grad():
                    wall, graphed, busy, launches, top = _time_step(lambda: block(h, tokens, step, rope),
                                                                    iters=10 if s < 4096 else 3,
                                                                    graph=phase == "decode")
                rows.append(Row(kind, phase, size, level.label, wall, graphed, busy, floor, launches, top))
    return {**hw, "preset": preset_name, "context": context, "exact_prefill_max": exact_prefill_max,
            "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"dsv4 bench layer on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"{result['date']}), {result['preset']} dimensions, decode context {result['context']} tokens",
             f"HBM {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s measured now ({result['hbm_method']}); "
             f"floor = weight bytes read / HBM",
             f"{'layer':6} {'phase':7} {'size':>6} {'level':16} {'wall us':>9} {'graph us':>9} {'gpu us':>9} "
             f"{'floor us':>9} {'graph/floor':>11} {'gpu/floor':>9} {'graph/fast':>10} {'kernels':>7}"]
    fast = {(r["layer"], r["phase"], r["size"]): r for r in result["rows"] if r["level"] == "fast"}
    ratio = (lambda a, b: f"{a / b:.2f}" if a and b else "")
    for r in result["rows"]:
        f = fast.get((r["layer"], r["phase"], r["size"]), {})
        graphed = f"{r['graph_us']:9.0f}" if r["graph_us"] else f"{'-':>9}"
        lines.append(f"{r['layer']:6} {r['phase']:7} {r['size']:>6} {r['level']:16} {r['wall_us']:9.0f} {graphed} "
                     f"{r['gpu_us']:9.0f} {r['floor_us']:9.1f} {ratio(r['graph_us'], r['floor_us']):>11} "
                     f"{ratio(r['gpu_us'], r['floor_us']):>9} {ratio(r['graph_us'], f.get('graph_us')):>10} "
                     f"{r['kernels']:>7}")
    lines.append(f"exact prefill timed up to {result['exact_prefill_max']} tokens")
    for r in result["rows"]:
        if r["phase"] == "decode" and r["size"] == 1:
            lines.append(f"costliest kernels, {r['layer']} decode batch 1 {r['level']}: " +
                         "; ".join(f"{name} {us:.0f}us x{calls}" for name, us, calls in r["top"]))
    return "\n".join(lines)
