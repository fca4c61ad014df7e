"""Speculative decoding benchmark (`dsv4 bench speculate`): the MTP block's drafts on held-out code, end to end.

A checkpoint (default: the embedded model) generates from prompts cut from the held-out standard-library files
(dsv4.evaluation: never trained on), once plainly and once per draft count N, through the engine as `dsv4 run`
does, at each level and batch size. Reported per row: the fraction of drafts accepted, the tokens a sequence gets
per verification step, decode tokens/s (engine timings: wall clock from the first token to the last, prefill
excluded; the best of `repeats` runs, interleaved with the other draft counts, for a machine shared with other
work), the speed-up over plain decoding, and whether every token equals plain decoding's. On a GPU each engine
generates once before the timed run, so that CUDA graph capture is not timed.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dsv4 import evaluation
from dsv4.api import load
from dsv4.backends.levels import Level
from dsv4.engine import Engine, Request, Timings
from dsv4.speculative import SpeculationStats


@dataclass
class Row:
    level: str
    batch: int
    drafts: int                 # 0: plain decoding
    decode_tokens: int
    decode_tokens_per_s: float  # the best of the repeats
    speedup: float              # decode tokens/s over plain decoding's at this level and batch
    acceptance_rate: float
    tokens_per_step: float      # per sequence and verification step (1.0 for plain decoding)
    identical: bool             # every token equals plain decoding's


def prompts(tokenizer, bos: int, count: int, length: int) -> list[list[int]]:
    """`count` prompts of BOS + `length` tokens: the start of evenly spaced held-out files at least that long."""
    files = evaluation.split(evaluation.stdlib_files())[1]
    ids = [tokenizer.encode(evaluation.read_source(f)) for f in files]
    long_enough = [t[:length] for t in ids if len(t) >= length]
    return [[bos, *t] for t in evaluation.evenly_spaced(long_enough, count)]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=__file__.rsplit("/", 1)[0], timeout=10).stdout.strip()
    except OSError:
        return ""


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _generate(pipe, requests: list[Request], batch: int,
              drafts: int) -> tuple[list[list[int]], float, Timings, SpeculationStats | None]:
    """(tokens, decode tokens/s, timings, speculation counts) of one generation by a fresh engine."""
    engine = Engine(pipe.model, pipe.device, max_batch=batch, speculate=drafts)
    if engine.graphs:                  # capture the decode graphs outside the timed run
        engine.generate(requests)
        engine.timings = Timings()
        if engine.speculator:
            engine.speculator.stats = SpeculationStats()
    tokens = [r.tokens for r in engine.generate(requests)]
    return tokens, engine.timings.decode_tps, engine.timings, engine.speculator.stats if drafts else None


def run(model: str | None, device: str, levels: tuple[Level, ...], batches: tuple[int, ...],
        drafts: tuple[int, ...], prompt_tokens: int, new_tokens: int, temperature: float, repeats: int = 1,
        progress: Callable[[str], None] = lambda _: None) -> dict:
    commit, rows = _commit(), []
    for level in levels:
        pipe = load(model, device=device, determinism=level)
        texts = prompts(pipe.tokenizer, pipe.config.bos_token_id, max(batches), prompt_tokens)
        for batch in batches:
            requests = [Request(p, new_tokens, temperature, request_id=i) for i, p in enumerate(texts[:batch])]
            runs: dict[int, list] = {}
            for repeat in range(repeats):          # interleaved, so that a slow spell of the machine hits all
                for n in (0, *drafts):
                    progress(f"{level.label} batch {batch} speculate {n} run {repeat + 1}/{repeats}")
                    runs.setdefault(n, []).append(_generate(pipe, requests, batch, n))
            plain_tokens, plain_tps = runs[0][0][0], max(r[1] for r in runs[0])
            for n, results in runs.items():
                tokens, _, timings, stats = results[0]
                best = max(r[1] for r in results)
                rows.append(Row(level.label, batch, n, timings.decode_tokens, best, best / plain_tps,
                                stats.acceptance_rate if stats else 0.0, stats.tokens_per_step if stats else 1.0,
                                all(r[0] == plain_tokens for r in results)))
    return {"model": model or "embedded default", "device": device, "machine": _machine(torch.device(device)),
            "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "temperature": temperature, "repeats": repeats, "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"dsv4 bench speculate: {result['model']} on {result['device']} ({result['machine']}, "
             f"{result['cpus']} threads, torch {result['torch']}, {result['date']}, {result['commit']}); "
             f"prompts of {result['prompt_tokens']} held-out tokens, {result['new_tokens']} new, temperature "
             f"{result['temperature']}, best of {result['repeats']} interleaved runs",
             f"{'level':16} {'batch':>5} {'N':>3} {'accepted':>8} {'tok/step':>8} {'decode tok/s':>12} "
             f"{'speed-up':>8} {'same tokens':>11}"]
    for r in result["rows"]:
        accepted = f"{100 * r['acceptance_rate']:.0f}%" if r["drafts"] else "-"
        lines.append(f"{r['level']:16} {r['batch']:>5} {r['drafts']:>3} {accepted:>8} {r['tokens_per_step']:8.2f} "
                     f"{r['decode_tokens_per_s']:12.1f} {r['speedup']:8.2f} {'yes' if r['identical'] else 'no':>11}")
    return "\n".join(lines)
