"""Where a speculative round's GPU time goes, on the embedded default model: the graph replay time of a plain decode
step and of rounds at k = 1 and 2, the kernels and GPU time of each part of a round run on its own, and the kernels
of each replay grouped by name (docs/speculative.md, "Performance").

usage (on a GPU machine, dsv4 installed):  python3 -P tools/profile_speculate.py [LEVEL] [BATCH]
"""
from __future__ import annotations

import functools
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import dsv4
from dsv4.benchmarks.timing import median_us
from dsv4.cache import Step
from dsv4.engine import Engine, Request
from dsv4.speculative import Rollback

PROMPT = 128          # tokens of every prompt
REPLAYS = 30          # replays a time is the median of


def gpu_kernels(fn) -> tuple[int, float, list]:
    """(kernels launched, their summed GPU microseconds, per-name averages) of one call of fn."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels), prof.key_averages()


def main(level: str = "exact", batch: int = 1) -> None:
    pipe = dsv4.load(device="cuda", determinism=level)
    engine = Engine(pipe.model, "cuda", max_batch=batch, speculate=2)
    spec, cache = engine.speculator, engine.cache
    requests = [Request(list(range(1, PROMPT + 1)), 64, request_id=i) for i in range(batch)]
    for slot, r in enumerate(requests):
        engine.prefill(r.prompt, slot)
    slots, last = list(range(batch)), [PROMPT] * batch
    for slot in slots:
        cache.reserve(slot, PROMPT + 8)
    print(f"{level}, batch {batch}, prompt {PROMPT}, {torch.cuda.get_device_name()}, torch {torch.__version__}")

    width = cache.table_width(PROMPT + 8)
    engine.decode(slots, [5] * batch, last, requests)                       # captures the plain graph
    plain = next(g for key, g in engine._graphs.items() if key[0] == "decode")
    print(f"plain decode step: {median_us(plain.graph.replay, REPLAYS):8.1f} us a replay")
    rounds = {}
    for k in (1, 2):
        rows = engine.rows([[5] * (k + 1)] * batch, last, slots, requests, [64] * batch)
        engine.run(("speculate", width, k, True), functools.partial(spec.verify, width=width, greedy=True), rows)
        rounds[k] = engine._graphs[("speculate", width, k, True, rows.slots.shape[0])]
        print(f"round k={k}:         {median_us(rounds[k].graph.replay, REPLAYS):8.1f} us a replay")

    rows = engine.rows([[5, 6]] * batch, last, slots, requests, [64] * batch).to(engine.device)
    step = Step(rows.start, rows.slots, cache, 2, cache.block_table[rows.slots, :width])
    one = engine.rows([[5]] * batch, last, slots, requests).to(engine.device)
    step1 = Step(one.start, one.slots, cache, 1, cache.block_table[one.slots, :width])
    h = engine.model(rows.tokens, step, all_logits=True)[1]

    def rollback(layers):
        undo = Rollback(cache, layers, rows.slots, rows.start, 2)
        for layer in layers:
            for state in (cache.layers[layer].compressor, cache.layers[layer].indexer):
                if state is not None:
                    state.journal.append((state.kv[rows.slots, :2].clone(), state.score[rows.slots, :2].clone()))
        undo.keep(torch.ones_like(rows.start))

    parts = {"main model, 1 position": lambda: engine.model(one.tokens, step1),
             "main model, 2 positions": lambda: engine.model(rows.tokens, step, all_logits=True),
             "MTP block, 2 positions": lambda: engine.model.mtp_forward(h, rows.tokens, step, all_logits=True),
             "MTP block, 1 position": lambda: engine.model.mtp_forward(h[:, :1], one.tokens, step1),
             "rollback, main layers": lambda: rollback(spec.main_layers),
             "draw, 2 positions": lambda: engine.draw(torch.zeros(2 * batch, pipe.config.vocab_size, device=engine.device),
                                                      *rows.sampling(2), (step.positions + 1).flatten())}
    print(f"{'part (eager)':28} {'kernels':>8} {'GPU us':>8}")
    for name, fn in parts.items():
        count, us, _ = gpu_kernels(fn)
        print(f"{name:28} {count:8d} {us:8.1f}")
    for name, graph in (("plain", plain), ("round k=1", rounds[1])):
        count, us, table = gpu_kernels(graph.graph.replay)
        print(f"--- {name} replay: {count} kernels, {us:.1f} GPU us")
        print(table.table(sort_by="device_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["exact"]), *([int(sys.argv[2])] if len(sys.argv) > 2 else []))
