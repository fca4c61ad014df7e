"""`dsv4 bench serve`: a workload of concurrent streamed requests with shared long prefixes, replayed against a real
`dsv4 serve` this benchmark starts (and restarts, for the disk-hit probe).

Measured: output throughput, time to first token and time per output token (p50, p99) under load, the prefix-cache
hit rate (prompt tokens served from the cache), and TTFT of a single request alone with its prefix cold (computed),
warm from memory, and warm from disk after a restart. Only the standard library talks to the server, so the
numbers include HTTP and SSE as a client sees them."""
from __future__ import annotations

import functools
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dsv4.errors import DSV4Error

STARTUP_LIMIT_S = 600      # a hang guard: loading a large checkpoint (or importing torch on a busy CPU) takes minutes
HEALTH_POLL_S = 0.2        # how often a starting server is asked for /health
STOP_LIMIT_S = 60          # a server not gone this long after SIGTERM is killed
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@dataclass
class Timing:
    ttft: float                 # seconds from sending to the first text
    tpot: float | None          # seconds per output token after the first (None: one token)
    tokens: int
    cached: int
    prompt: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class ServerProcess:
    """`dsv4 serve ARGS` on a free local port, with `env` on top of this process's environment and its stderr appended
    to `log`; returns once /health answers. Stopped by `stop()` or at the end of a `with` block."""

    def __init__(self, args: list[str], log: str | os.PathLike, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "a") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "dsv4.cli", "serve", "--port", str(self.port), *args],
                                         stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ | (env or {}))
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            if self.proc.poll() is not None:
                raise DSV4Error(f"dsv4 serve exited with {self.proc.returncode}; its log: {log}")
            try:
                self.health()
                return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise DSV4Error(f"dsv4 serve did not answer within {STARTUP_LIMIT_S} s; its log: {log}")
                time.sleep(HEALTH_POLL_S)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health") as r:
            return json.load(r)

    @functools.cached_property
    def model(self) -> str:
        """The id of the served model."""
        with urllib.request.urlopen(f"{self.url}/v1/models") as r:
            return json.load(r)["data"][0]["id"]

    def complete(self, model: str, prompt: str, max_tokens: int) -> Timing:
        """One streamed completion (greedy, exactly max_tokens tokens unless the model ends first)."""
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STARTUP_LIMIT_S)
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise DSV4Error(f"the server answered {response.status}: {response.read()[:200]!r}")
        arrivals, usage = [], None
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise DSV4Error(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            usage = chunk.get("usage") or usage
        conn.close()
        n = usage["completion_tokens"]
        tpot = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else None
        return Timing(arrivals[0] - start if arrivals else float("nan"), tpot, n,
                      usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(server_args: list[str], requests: int, concurrency: int, prefixes: int, prefix_words: int,
        suffix_words: int, max_tokens: int, probes: int, say: Callable[[str], None]) -> dict:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-serve-") as tmp:
        args = [*server_args, "--prefix-cache-dir", os.path.join(tmp, "prefixes")]
        log = os.path.join(tmp, "serve.log")
        probe_prefixes = [text(rng, prefix_words) for _ in range(probes)]
        shared = [text(rng, prefix_words) for _ in range(prefixes)]

        def suffix() -> str:
            return "\n" + text(rng, suffix_words)

        say("starting dsv4 serve")
        with ServerProcess(args, log) as server:
            model = server.model
            say(f"TTFT probes, cold then from memory ({probes} each)")
            server.complete(model, "warm up", 2)
            cold = [server.complete(model, p + suffix(), 1) for p in probe_prefixes]
            memory = [server.complete(model, p + suffix(), 1) for p in probe_prefixes]
            say(f"workload: {requests} requests, {concurrency} at a time, {prefixes} shared prefixes")
            before = server.health()["prefix_cache"]
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                load = list(pool.map(lambda p: server.complete(model, p, max_tokens),
                                     [shared[i % prefixes] + suffix() for i in range(requests)]))
            wall = time.perf_counter() - started
            after = server.health()["prefix_cache"]
        say("restarting dsv4 serve for the disk probes")
        with ServerProcess(args, log) as server:
            disk = [server.complete(model, p + suffix(), 1) for p in probe_prefixes]
            disk_hits = server.health()["prefix_cache"]["disk_hits"]

    prompt_tokens = after["prompt_tokens"] - before["prompt_tokens"]
    hit_tokens = sum(after[k] - before[k] for k in ("memory_tokens", "disk_tokens"))
    tpots = [t.tpot for t in load if t.tpot is not None]
    return {
        "server_args": server_args, "requests": requests, "concurrency": concurrency, "shared_prefixes": prefixes,
        "prompt_tokens_mean": statistics.mean(t.prompt for t in load), "max_tokens": max_tokens,
        "output_tokens": sum(t.tokens for t in load), "wall_s": wall,
        "output_tokens_per_s": sum(t.tokens for t in load) / wall,
        "ttft_p50_s": percentile([t.ttft for t in load], 0.5), "ttft_p99_s": percentile([t.ttft for t in load], 0.99),
        "tpot_p50_s": percentile(tpots, 0.5), "tpot_p99_s": percentile(tpots, 0.99),
        "prefix_hit_rate": hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        "probe_prompt_tokens": cold[0].prompt,
        "ttft_cold_s": statistics.median(t.ttft for t in cold),
        "ttft_memory_hit_s": statistics.median(t.ttft for t in memory),
        "ttft_disk_hit_s": statistics.median(t.ttft for t in disk),
        "probe_cached_tokens": {"cold": [t.cached for t in cold], "memory": [t.cached for t in memory],
                                "disk": [t.cached for t in disk]},
        "disk_hits_after_restart": disk_hits,
    }


def table(result: dict) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms"   # noqa: E731
    rows = [
        ("workload", f"{result['requests']} requests, {result['concurrency']} at a time, "
                     f"~{result['prompt_tokens_mean']:.0f} prompt tokens, {result['max_tokens']} new tokens each"),
        ("output throughput", f"{result['output_tokens_per_s']:.1f} tokens/s"),
        ("TTFT p50 / p99", f"{ms(result['ttft_p50_s'])} / {ms(result['ttft_p99_s'])}"),
        ("TPOT p50 / p99", f"{ms(result['tpot_p50_s'])} / {ms(result['tpot_p99_s'])}"),
        ("prefix-cache hit rate", f"{result['prefix_hit_rate']:.0%} of prompt tokens"),
        (f"TTFT alone, {result['probe_prompt_tokens']} prompt tokens",
         f"cold {ms(result['ttft_cold_s'])}, memory hit {ms(result['ttft_memory_hit_s'])}, "
         f"disk hit after restart {ms(result['ttft_disk_hit_s'])}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
