"""A real `dsv4 serve` process on a free local port, driven by the official openai client (tests of dsv4.serve)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

STARTUP_LIMIT_S = 180     # a hang guard, not a timing claim: a slow shared CPU may take this long to import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, log_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dsv4.cli", "serve", "--port", str(self.port), *args],
                                         stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv4 serve exited with {self.proc.returncode}: {self.log()}")
            try:
                self.health()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"dsv4 serve did not start: {self.log()}")
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health") as r:
            return json.load(r)

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

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
