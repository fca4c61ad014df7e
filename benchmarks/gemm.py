"""Quantised GEMM benchmark at real DeepSeek-V4 layer shapes: every registered kernel of `quant_linear` /
`grouped_quant_linear` on one device, against baselines and the hardware limit measured in the same run.

Reported per shape and batch size: microseconds, the fraction of the HBM bandwidth limit reached (weight and
activation bytes / measured copy bandwidth, divided by the time), and ratios to cuBLAS bf16 and to torch._scaled_mm
FP8 (per-tensor scales: a lower bound on what a block-scaled FP8 GEMM costs in cuBLAS).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from dsv4.backends.registry import default_registry
from dsv4.config import preset
from dsv4.formats import quantize_weight_fp4, quantize_weight_fp8


@dataclass
class Row:
    shape: str
    m: int
    kernel: str
    level: str
    us: float
    hbm_fraction: float
    vs_cublas_bf16: float
    vs_scaled_mm_fp8: float


def layer_shapes(name: str) -> list[tuple[str, int, int, str]]:
    """(label, N, K, format) of the quantised linears of one layer of a preset (routed experts are FP4)."""
    c = preset(name)
    return [("wq_a", c.q_lora_rank, c.dim, "fp8"), ("wq_b", c.n_heads * c.head_dim, c.q_lora_rank, "fp8"),
            ("wkv", c.head_dim, c.dim, "fp8"), ("wo_b", c.dim, c.o_groups * c.o_lora_rank, "fp8"),
            ("shared_w1", c.moe_inter_dim, c.dim, "fp8"), ("shared_w2", c.dim, c.moe_inter_dim, "fp8"),
            ("expert_w1", c.moe_inter_dim, c.dim, "fp4"), ("expert_w2", c.dim, c.moe_inter_dim, "fp4")]


def time_us(fn, iters: int = 20) -> float:
    """GPU time of one call in microseconds: the call is captured in a CUDA graph (so host-side launch overhead is
    excluded, as in a decode loop under graphs) and the median of `iters` timed replays is taken."""
    fn()                                                     # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); graph.replay(); end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def hbm_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), measured now."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a), iters=10)
    return 2 * a.numel() / (us * 1e-6)


def run(preset_name: str = "v4-flash", batches: tuple[int, ...] = (1, 16, 64, 256), device: str = "cuda",
        composite_max_m: int = 16) -> dict:
    dev = torch.device(device)
    registry = default_registry()
    backend = registry.backend_for_device(dev.type)
    bandwidth = hbm_bandwidth(dev)
    rows: list[Row] = []
    for label, n, k, fmt in layer_shapes(preset_name):
        w = torch.randn(n, k, device=dev) * k ** -0.5
        weight, scale = quantize_weight_fp8(w) if fmt == "fp8" else quantize_weight_fp4(w)
        w_bf16, w_fp8 = w.bfloat16(), weight if fmt == "fp8" else w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        for m in batches:
            x = torch.randn(m, k, device=dev).bfloat16()
            x8 = torch.zeros(max(16, m), k, device=dev, dtype=torch.float8_e4m3fn)
            cublas = time_us(lambda: x @ w_bf16.T)
            scaled = time_us(lambda: torch._scaled_mm(x8, w_fp8.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            floor_bytes = weight.numel() * weight.element_size() + scale.numel() * 4 + x.numel() * 2 + m * n * 2
            for kern in backend.kernels["quant_linear"]:
                if kern.name == "canonical" and m > composite_max_m:
                    continue
                us = time_us(lambda: kern.fn(x, weight, scale), iters=5 if kern.name == "canonical" else 20)
                rows.append(Row(f"{label} {n}x{k} {fmt}", m, kern.name, kern.level.label, us,
                                floor_bytes / bandwidth / (us * 1e-6), us / cublas, us / scaled))
    return {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "preset": preset_name,
            "date": time.strftime("%Y-%m-%d"), "hbm_bytes_per_s": bandwidth,
            "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"quant GEMM on {result['device']} ({result['torch']}), {result['preset']} shapes, "
             f"measured HBM {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s",
             f"{'shape':28} {'M':>4} {'kernel':18} {'level':16} {'us':>9} {'%HBM':>6} {'/bf16':>7} {'/fp8mm':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['shape']:28} {r['m']:>4} {r['kernel']:18} {r['level']:16} {r['us']:9.1f} "
                     f"{100 * r['hbm_fraction']:6.1f} {r['vs_cublas_bf16']:7.2f} {r['vs_scaled_mm_fp8']:7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    out = run()
    print(table(out))
    print(json.dumps(out))
