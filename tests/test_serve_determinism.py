"""The promise of `dsv4 serve` at `exact`: a request's tokens and logprobs are the same bits alone, among random
concurrent traffic, with its prefix computed, taken from the prefix cache in memory, or read from disk after a
restart."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

from serving import Server

# One cache block (256 positions) is BOS + 255 bytes: prompts starting with SHARED share their first block.
SHARED = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
          * 4)[:255]
TARGETS = [   # (prompt, sampling settings): greedy and sampled, with and without the shared prefix
    (SHARED + "\n\ndef median(values):\n", dict(temperature=0)),
    (SHARED + "\n\nclass Stats:\n", dict(temperature=0.9, seed=3)),
    ("import os\n", dict(temperature=0.7, seed=11)),
]
TRAFFIC = [
    (SHARED + "\n\ndef mode(values):\n", dict(temperature=0, max_tokens=7)),
    ("# a long unshared prompt\n" + "x = [i * i for i in range(10)]\n" * 9, dict(temperature=0, max_tokens=3)),
    ("print(", dict(temperature=1.0, seed=5, max_tokens=9)),
    (SHARED[:200], dict(temperature=0, max_tokens=4)),
]
ARGS = ("--determinism", "exact", "--max-batch", "4")


def ask(server: Server, prompt: str, settings: dict) -> tuple:
    r = server.client.completions.create(model=server.model, prompt=prompt, logprobs=2,
                                         **({"max_tokens": 5} | settings))
    lp = r.choices[0].logprobs
    return (r.choices[0].text, lp.tokens, lp.token_logprobs, lp.top_logprobs), r.usage.prompt_tokens_details


def burst(server: Server, seed: int) -> list:
    """The targets among the traffic, in a random order with random arrival gaps; the targets' answers."""
    rng = random.Random(seed)
    work = [(True, i, job) for i, job in enumerate(TARGETS)] + [(False, i, job) for i, job in enumerate(TRAFFIC)]
    rng.shuffle(work)
    delays = [rng.uniform(0, 1.5) for _ in work]

    def send(item):
        (is_target, i, (prompt, settings)), delay = item
        time.sleep(delay)
        return is_target, i, ask(server, prompt, settings)

    with ThreadPoolExecutor(len(work)) as pool:
        done = list(pool.map(send, zip(work, delays)))
    return [answer for _, _, answer in sorted(d for d in done if d[0])]


def test_tokens_and_logprobs_are_the_same_alone_concurrent_cached_and_restored(server, tmp_path):
    alone = [ask(server, prompt, settings)[0] for prompt, settings in TARGETS]     # no prefix cache: all computed

    store = tmp_path / "prefixes"
    with Server(tmp_path / "warm.log", *ARGS, "--prefix-cache-dir", str(store)) as warm:
        ask(warm, SHARED + "\n\n", dict(max_tokens=1))        # puts the shared block in memory and on disk
        from_memory = burst(warm, seed=1)
        health = warm.health()
    assert [answer for answer, _ in from_memory] == alone
    assert [usage.cached_tokens for _, usage in from_memory] == [256, 256, 0]
    assert health["prefix_cache"]["memory_hits"] >= 2 and health["disk_cache"]

    with Server(tmp_path / "restarted.log", *ARGS, "--prefix-cache-dir", str(store)) as restarted:
        from_disk = burst(restarted, seed=2)
        health = restarted.health()
    assert [answer for answer, _ in from_disk] == alone
    assert [usage.cached_tokens for _, usage in from_disk] == [256, 256, 0]
    assert health["prefix_cache"]["disk_hits"] >= 1
