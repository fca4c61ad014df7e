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


def hbm_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (bytes read + written), measured now."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us, _ = time_us(lambda: b.copy_(a), iters=10)
    return 2 * a.numel() / (us * 1e-6)


def tensor_core_peak(device: torch.device) -> float:
    """FLOP/s of a large bf16 matmul (8192^3, cuBLAS), measured now: the dense tensor-core rate reachable in practice."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    us, _ = time_us(lambda: a @ b, iters=10)
    return 2 * n ** 3 / (us * 1e-6)


def limits(device: torch.device) -> dict:
    """The hardware limits every benchmark reports against, with the device and software that measured them."""
    import time

    import triton

    return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "hbm_bytes_per_s": hbm_bandwidth(device),
            "tensor_core_flops": tensor_core_peak(device)}
