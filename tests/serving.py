"""A real `dsv4 serve` process, started by the benchmark's launcher and driven by the official openai client (tests
of dsv4.serve)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from dsv4.benchmarks.serve import ServerProcess
from dsv4.errors import DSV4Error

REQUEST_LIMIT_S = 600     # a hang guard for one request, not a timing claim


class Server(ServerProcess):
    """`dsv4 serve ARGS` on one CPU thread (this process's client shares the cores), its stderr in `log`, with an
    openai client on it."""

    def __init__(self, log: Path, *args: str):
        try:
            super().__init__(list(args), log, env={"OMP_NUM_THREADS": "1"})
        except DSV4Error as e:
            raise RuntimeError(f"{e}:\n{Path(log).read_text()}") from None
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                    timeout=REQUEST_LIMIT_S)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        """A raw POST (for bodies the openai client cannot send): (status, JSON reply)."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def wait_until(self, predicate, what: str, limit_s: float = 120) -> dict:
        """Poll /health until predicate(health) holds (a hang guard bounds the wait; nothing is timed)."""
        deadline = time.monotonic() + limit_s
        while True:
            health = self.health()
            if predicate(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"server never reached: {what}; last /health: {health}")
            time.sleep(0.05)
