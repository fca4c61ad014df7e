"""A plain Triton kernel that streams a large buffer from device memory once: the read bandwidth an SM kernel
reaches, one of the methods behind the HBM limit the benchmarks report against (benchmarks/timing.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096          # int32 words per program per step (16 KiB)
STEPS = 16            # steps per program: each program reads BLOCK * STEPS words


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Reads STEPS consecutive blocks and stores one xor of everything read (so no load can be skipped)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], tl.int32)
    for step in tl.range(0, STEPS):
        i = first + step * BLOCK + tl.arange(0, BLOCK)
        acc = acc ^ tl.load(src_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def read_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Bytes/s of the streaming read over `nbytes` (median of `iters` timed runs after a warm-up)."""
    from dsv4.benchmarks.timing import median_us

    src = torch.randint(-2 ** 31, 2 ** 31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
    programs = triton.cdiv(src.numel(), BLOCK * STEPS)
    out = torch.empty(programs, dtype=torch.int32, device=device)

    def run():
        _read_kernel[(programs,)](src, out, src.numel(), BLOCK=BLOCK, STEPS=STEPS, num_warps=8)
    run()
    torch.cuda.synchronize(device)
    return src.numel() * 4 / (median_us(run, iters) * 1e-6)
