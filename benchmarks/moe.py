"""Expert-parallel MoE exchange benchmark: dispatch and combine across the ranks of a running group, against the raw
collectives on the same tensor sizes, measured in the same run.

For each token count T every rank routes T tokens to k of E experts (the same random routing on every rank, as the
replicated gate gives) and times, as the median over iterations of the slowest rank:
- dispatch: `moe_dispatch` and the pick of this rank's rows (local: no communication);
- `ep_combine` as the registry resolves it at `exact` (all-gather of the rows, then the local `moe_combine`), its
  all-gather alone, and a raw `all_gather` of the same padded [N, rows, d] bf16 buffer;
- `ep_combine` at `fast` (fp32 partial sums and an all-reduce), and a raw `all_reduce` of the same [T, d] fp32 tensor.
Bandwidth is nccl-tests' bus bandwidth of the collective each piece runs (all-gather: bytes * (N-1)/N / time;
all-reduce: bytes * 2(N-1)/N / time), so a piece's bandwidth divided by its raw collective's is the fraction of the
achievable bandwidth it reaches.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from dsv4.api import resolve_ops
from dsv4.config import preset
from dsv4.parallel import ExpertGroup


@dataclass
class Row:
    tokens: int
    piece: str
    us: float
    megabytes: float          # moved by the piece's collective (0: local)
    bus_gb_per_s: float
    of_raw: float             # bus bandwidth / the raw collective's (0: local)


def run(group: ExpertGroup, device: str = "cpu", preset_name: str = "v4-flash",
        token_counts: tuple[int, ...] = (16, 128, 512), iters: int = 20) -> dict:
    config = preset(preset_name)
    dev = torch.device(device)
    exact, fast = resolve_ops(device, "exact"), resolve_ops(device, "fast")
    n, k, d, e = group.size, config.n_activated_experts, config.dim, config.n_routed_experts
    rows: list[Row] = []
    for t in token_counts:
        g = torch.Generator().manual_seed(t)
        experts = torch.rand(t, e, generator=g).argsort(dim=-1)[:, :k].to(dev)
        order, counts = exact.moe_dispatch(experts, e)
        own = order[group.own_rows(counts)]
        local = torch.randn(own.numel(), d, generator=g).to(dev, torch.bfloat16)
        shared = torch.randn(t, d, generator=g).to(dev, torch.bfloat16)
        longest = max(group.rows_per_rank(counts))
        padded, gathered = local.new_zeros(longest, d), local.new_empty(n, longest, d)
        partial = torch.zeros(t, d, device=dev)
        gather_bytes, reduce_bytes = n * longest * d * 2, t * d * 4

        def timed(fn: Callable[[], object]) -> float:
            return _median_us(fn, group, dev, iters)

        gather, reduce = (n - 1) / n, 2 * (n - 1) / n                      # bus-bandwidth factors
        raw_gather = timed(lambda: dist.all_gather(list(gathered.unbind(0)), padded, group=group.process_group))
        raw_reduce = timed(lambda: dist.all_reduce(partial, group=group.process_group))
        pieces = [   # (piece, us, bytes its collective moves, bus factor, the raw collective's us on those bytes)
            ("raw all_gather", raw_gather, gather_bytes, gather, raw_gather),
            ("ep_combine exact: all-gather", timed(lambda: group.gather_rows(local, counts)), gather_bytes, gather,
             raw_gather),
            ("ep_combine exact: total", timed(lambda: exact.ep_combine(local, order, counts, k, shared, group)),
             gather_bytes, gather, raw_gather),
            ("raw all_reduce fp32", raw_reduce, reduce_bytes, reduce, raw_reduce),
            ("ep_combine fast: total", timed(lambda: fast.ep_combine(local, order, counts, k, shared, group)),
             reduce_bytes, reduce, raw_reduce)]
        rows.append(Row(t, "dispatch (local)", timed(lambda: exact.moe_dispatch(experts, e)[0][group.own_rows(counts)]),
                        0.0, 0.0, 0.0))
        rows += [Row(t, piece, us, size / 1e6, size * factor / us / 1e3, raw / us)
                 for piece, us, size, factor, raw in pieces]
    return {"device": str(dev), "backend": exact.backend, "ranks": n, "torch": torch.__version__,
            "process_group": dist.get_backend(group.process_group), "preset": preset_name,
            "dim": d, "experts": e, "topk": k, "date": time.strftime("%Y-%m-%d"), "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"expert-parallel MoE exchange: {result['ranks']} ranks on {result['device']} "
             f"({result['process_group']}, torch {result['torch']}), {result['preset']} sizes: d={result['dim']}, "
             f"E={result['experts']}, k={result['topk']}",
             f"{'T':>5}  {'piece':30} {'us':>10} {'MB':>8} {'bus GB/s':>9} {'of raw':>7}"]
    for r in result["rows"]:
        moved = f"{r['megabytes']:8.2f} {r['bus_gb_per_s']:9.2f} {100 * r['of_raw']:6.0f}%" if r["megabytes"] else \
            f"{'-':>8} {'-':>9} {'-':>7}"
        lines.append(f"{r['tokens']:>5}  {r['piece']:30} {r['us']:10.1f} {moved}")
    return "\n".join(lines)


def _median_us(fn: Callable[[], object], group: ExpertGroup, device: torch.device, iters: int) -> float:
    """The slowest rank's median time of `fn` (microseconds); the ranks start each call together."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier(group=group.process_group)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = torch.tensor([sorted(times)[len(times) // 2] * 1e6], dtype=torch.float64, device=device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX, group=group.process_group)
    return median.item()


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
