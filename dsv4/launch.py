"""`--nproc N`: run one dsv4 command as N local processes, the way torchrun would, and end them all together.

The launcher hosts the rendezvous store on a free loopback port (127.0.0.1 only) and starts N copies of the same
command line with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, and
TORCHELASTIC_USE_AGENT_STORE=True: the store is ours). Rank 0's standard output is the user's; its standard error is
passed through except for its error line. When a process fails, the others are killed and the first failure
(in the order the processes ended) becomes the launcher's one-line error: a process that dies takes the others down
with it, and no process outlives the launcher.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from datetime import timedelta

import torch.distributed as dist

from dsv4.errors import DSV4Error

ERROR_PREFIX = "error: "


class _Worker:
    """One started process: its rank, and what its standard error said (the error line, the last line)."""

    def __init__(self, rank: int, command: list[str], env: dict[str, str]):
        self.rank, self.error, self.last_line = rank, "", ""
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, errors="replace")
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            if line.startswith(ERROR_PREFIX):
                self.error = line[len(ERROR_PREFIX):].strip()
            elif line.strip():
                self.last_line = line.strip()
                if self.rank == 0:
                    sys.stderr.write(line)
                    sys.stderr.flush()

    def failure(self) -> str:
        """One line saying how this process failed."""
        self.reader.join(timeout=5)
        code = self.process.returncode
        if self.error:
            return self.error if self.error.startswith("rank ") else f"rank {self.rank}: {self.error}"
        if code < 0:
            return f"rank {self.rank} died (killed by {signal.Signals(-code).name})"
        return f"rank {self.rank} exited with status {code}" + (f": {self.last_line}" if self.last_line else "")


def launch(nproc: int, args: list[str]) -> None:
    """Run `dsv4 <args>` as `nproc` ranks; return when all succeeded, else raise the first failure as a DSV4Error."""
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timedelta(seconds=60),
                          wait_for_workers=False)
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True", "PYTHONSAFEPATH": "1"}
    # Share the cores among the ranks unless the user chose a thread count.
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "dsv4.cli", *args]
    workers: list[_Worker] = []
    ended: queue.Queue[_Worker] = queue.Queue()
    try:
        for rank in range(nproc):
            workers.append(_Worker(rank, command, {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        for w in workers:
            threading.Thread(target=lambda w=w: (w.process.wait(), ended.put(w)), daemon=True).start()
        for _ in range(nproc):
            w = ended.get()
            if w.process.returncode != 0:
                _stop(workers)
                raise DSV4Error(w.failure())
        for w in workers:
            w.reader.join(timeout=5)
    finally:
        _stop(workers)


def _stop(workers: list[_Worker]) -> None:
    for w in workers:
        if w.process.poll() is None:
            w.process.kill()
    for w in workers:
        w.process.wait()
