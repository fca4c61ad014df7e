"""How dsv4's benchmarks time GPU work and measure the hardware limits they report against, in the same run."""
from __future__ import annotations

from typing import Callable

import torch


def time_us(fn: Callable[[], object], iters: int = 20) -> tuple[float, bool]:
    """(median GPU time of one call in microseconds, whether it ran under a CUDA graph).

    The call is captured in a CUDA graph when it can be (host-side launch overhead then does not count, as in a
    decode loop under graphs); a call that synchronises with the host (e.g. reads a count to size its grid) cannot
    be captured and is timed eagerly, launch overhead included."""
    fn()                                                     # compile / warm up outside any capture
    torch.cuda.synchronize()
    run = fn
    graphed = True
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        run = graph.replay
    except Exception:                                        # not capturable: time it eagerly
        graphed = False
        torch.cuda.synchronize()
    torch.cuda.synchronize()
    return median_us(run, iters), graphed


def median_us(run: Callable[[], object], iters: int) -> float:
    """Median microseconds of `iters` calls of `run`, each between two CUDA events and a synchronisation."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


HBM_PROBE_BYTES = 2 << 30     # every bandwidth probe moves at least this much (several times the 60 MB L2)


def hbm_bandwidths(device: torch.device) -> dict[str, float]:
    """Bytes/s of device memory by several methods, measured now (read + written bytes for copies, read bytes for the
    streaming kernel). Methods differ: a copy captured in a CUDA graph becomes a copy-engine memcpy node, slower than
    the SM copy kernel an eager `copy_` launches, so one method alone can understate the limit by 1.5x (seen on an
    H200: 2.74 against 4.14 TB/s)."""
    import triton.testing

    from dsv4.benchmarks.stream import read_bandwidth

    streaming = read_bandwidth(device, HBM_PROBE_BYTES)       # before the copy buffers take their 2 GiB
    a = torch.empty(HBM_PROBE_BYTES // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    moved = 2 * a.numel()
    eager_us = median_us(lambda: b.copy_(a), 10)
    graphed_us, _ = time_us(lambda: b.copy_(a), iters=10)
    do_bench_ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    return {"copy eager (events)": moved / (eager_us * 1e-6),
            "copy in a CUDA graph (events)": moved / (graphed_us * 1e-6),
            "copy (triton do_bench median)": moved / (do_bench_ms * 1e-3),
            "triton streaming read kernel": streaming}


def tensor_core_peak(device: torch.device) -> float:
    """FLOP/s of a large bf16 matmul (8192^3, cuBLAS), measured now: the dense tensor-core rate reachable in practice."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    us, _ = time_us(lambda: a @ b, iters=10)
    return 2 * n ** 3 / (us * 1e-6)


def level_tables(device: torch.device, levels) -> dict:
    """The op table of the device's backend at each level, resolved as `dsv4 run` would."""
    from dsv4.backends.registry import default_registry

    registry = default_registry()
    backend = registry.backend_for_device(device.type)
    return {level: registry.resolve(backend, level) for level in levels}


def limits(device: torch.device) -> dict:
    """The hardware limits every benchmark reports against, with the device and software that measured them. The HBM
    limit is the best of the methods of `hbm_bandwidths` (each one is recorded, and which one won)."""
    import time

    import triton

    methods = hbm_bandwidths(device)
    best = max(methods, key=methods.get)
    return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "hbm_bytes_per_s": methods[best], "hbm_method": best,
            "hbm_methods": methods, "tensor_core_flops": tensor_core_peak(device)}
