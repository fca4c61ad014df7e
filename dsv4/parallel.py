"""Expert parallelism: which process owns which routed experts, and the process group that joins the processes.

Every process (rank) runs the same tokens through everything except the routed experts: attention, gate, shared
expert and head are replicated, so every rank computes the same routing bit for bit. Rank r of N owns the contiguous
experts [r*E/N, (r+1)*E/N) and loads only those. After the experts, the `ep_combine` op (backends/contracts.py)
brings every rank's expert outputs together; see docs/expert-parallel.md.

`join` builds the group from the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK);
`dsv4 run --nproc N` starts its processes with the same variables (dsv4.launch). Every failure — a bad launch, a
rank that dies or hangs — ends in a one-line DSV4Error within the timeout, never in a hang.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv4.errors import DSV4Error

PROCESS_GROUP_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_POLL = 0.05
_KEYS = "dsv4/join/"


def expert_range(n_experts: int, rank: int, size: int) -> range:
    """The routed experts rank `rank` of `size` owns: a contiguous, equal share."""
    if size > n_experts:
        raise DSV4Error(f"{size} processes but the model has only {n_experts} routed experts: each process needs "
                        f"at least one")
    if n_experts % size:
        raise DSV4Error(f"the {n_experts} routed experts cannot be split evenly over {size} processes: use a "
                        f"process count that divides {n_experts}")
    per = n_experts // size
    return range(rank * per, (rank + 1) * per)


@dataclass(frozen=True)
class ExpertGroup:
    """This process's place among the expert-parallel ranks, and the collectives the MoE needs (data movement and,
    for the `fast` combine only, a sum)."""
    rank: int
    size: int
    local_rank: int
    process_group: dist.ProcessGroup

    def experts(self, n_experts: int) -> range:
        return expert_range(n_experts, self.rank, self.size)

    def rows_per_rank(self, counts: torch.Tensor) -> list[int]:
        """Dispatch-order rows (token, slot pairs) of each rank's experts, from the per-expert counts."""
        return counts.view(self.size, -1).sum(dim=1).tolist()

    def own_rows(self, counts: torch.Tensor) -> slice:
        """This rank's rows in the dispatch order: its experts are contiguous, so their rows are too."""
        rows = self.rows_per_rank(counts)
        start = sum(rows[:self.rank])
        return slice(start, start + rows[self.rank])

    def gather_rows(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every rank's `rows` (its own_rows of the dispatch order) concatenated in rank order, on every rank.
        Pure data movement: each rank's block is padded to the longest and all-gathered, then the padding dropped."""
        sizes = self.rows_per_rank(counts)
        longest = max(sizes)
        padded = rows.new_zeros(longest, *rows.shape[1:])
        padded[:rows.shape[0]] = rows
        gathered = rows.new_empty(self.size, longest, *rows.shape[1:])
        self._collective("all_gather", dist.all_gather, list(gathered.unbind(0)), padded, group=self.process_group)
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks, in the collective's own order (which depends on the algorithm and the degree)."""
        self._collective("all_reduce", dist.all_reduce, t, group=self.process_group)
        return t

    def place(self, device: str) -> str:
        """The device this rank uses: an accelerator type without an index becomes the local rank's one."""
        return device if device == "cpu" or ":" in device else f"{device}:{self.local_rank}"

    def _collective(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:   # gloo/nccl/hccl report a dead peer or a timeout as RuntimeError subclasses
            raise DSV4Error(f"rank {self.rank} lost the other ranks in the expert-parallel {what}: "
                            f"{_first_line(e)}") from None


@contextmanager
def join(device_type: str, settings: dict, timeout: float) -> Iterator[ExpertGroup | None]:
    """The expert-parallel group of a launched process (None in a plain single-process run), torn down on exit.
    `timeout` (seconds) bounds every wait for the other ranks: the rendezvous and each collective.

    Before any process group exists, every rank checks that all ranks were started with the same world size and the
    same `settings` (JSON-serialisable: model, level, prompts, ...), so that a mismatched launch fails at once."""
    launch = launch_environment()
    if launch is None or launch[1] == 1:
        yield None
        return
    rank, size, local_rank, address, port = launch
    if device_type not in PROCESS_GROUP_BACKENDS:
        raise DSV4Error(f"no process-group backend for device type {device_type!r}; expert parallelism runs on "
                        f"{', '.join(PROCESS_GROUP_BACKENDS)}")
    store = _connect(address, port, rank, timeout)
    _agree(store, rank, size, json.loads(json.dumps({"world_size": size, **settings})), timeout)
    try:
        dist.init_process_group(PROCESS_GROUP_BACKENDS[device_type], store=dist.PrefixStore("dsv4/pg", store),
                                rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        raise DSV4Error(f"rank {rank} could not form the {PROCESS_GROUP_BACKENDS[device_type]} process group: "
                        f"{_first_line(e)}") from None
    try:
        yield ExpertGroup(rank, size, local_rank, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
        _leave(store, rank, size, timeout)


def launch_environment() -> tuple[int, int, int, str, int] | None:
    """(rank, world size, local rank, master address, master port) from torchrun's variables; None when neither RANK
    nor WORLD_SIZE is set (a plain run). A launch that sets some but not all of them is refused, naming the missing."""
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [name for name in LAUNCH_VARIABLES if not env.get(name)]
    if missing and env.get("WORLD_SIZE") != "1":
        raise DSV4Error(f"incomplete multi-process launch: {', '.join(missing)} not set (a launch sets "
                        f"{', '.join(LAUNCH_VARIABLES)}, as torchrun does; or use dsv4 run --nproc N)")
    try:
        rank, size = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
        local_rank, port = int(env.get("LOCAL_RANK", rank)), int(env.get("MASTER_PORT", "0"))
    except (KeyError, ValueError) as e:
        raise DSV4Error(f"bad multi-process launch variables: {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise DSV4Error(f"bad multi-process launch: RANK={rank} is not in [0, WORLD_SIZE={size})")
    return rank, size, local_rank, env.get("MASTER_ADDR", ""), port


def _connect(address: str, port: int, rank: int, timeout: float) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT: hosted by rank 0, or by the launcher when it says so (torchrun
    and dsv4.launch set TORCHELASTIC_USE_AGENT_STORE=True and host it themselves)."""
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        return dist.TCPStore(address, port, None, is_master=host, timeout=timedelta(seconds=timeout),
                             wait_for_workers=False)
    except RuntimeError as e:
        raise DSV4Error(f"rank {rank} could not {'host' if host else 'reach'} the rendezvous at {address}:{port}: "
                        f"{_first_line(e)}") from None


def _leave(store: dist.Store, rank: int, size: int, timeout: float) -> None:
    """Rank 0 may host the store: it waits until every rank has torn its process group down, since a rank still
    tearing down when the store disappears aborts ("terminate called without an active exception")."""
    left = store.add(f"{_KEYS}left", 1)
    deadline = time.monotonic() + timeout
    while rank == 0 and left < size and time.monotonic() < deadline:
        time.sleep(0.01)
        left = store.add(f"{_KEYS}left", 0)


def _agree(store: dist.Store, rank: int, size: int, claim: dict, timeout: float) -> None:
    """Wait until every rank has posted the same claim; the first rank to see a difference posts it for all."""
    abort = _KEYS + "abort"

    def fail(message: str) -> None:
        store.set(abort, message)
        raise DSV4Error(message)

    try:
        if store.add(f"{_KEYS}count/{rank}", 1) > 1:
            fail(f"two processes were started as rank {rank}")
        store.set(f"{_KEYS}{rank}", json.dumps(claim, sort_keys=True))
        pending, deadline = set(range(size)), time.monotonic() + timeout
        while True:
            if store.check([abort]):
                raise DSV4Error(store.get(abort).decode())
            for other in sorted(pending):
                if store.check([f"{_KEYS}{other}"]):
                    theirs = json.loads(store.get(f"{_KEYS}{other}"))
                    if theirs != claim:
                        fail(_difference(rank, claim, other, theirs))
                    pending.discard(other)
            if not pending:
                return
            if time.monotonic() > deadline:
                fail(f"rank(s) {', '.join(map(str, sorted(pending)))} did not join within {timeout:g} s")
            time.sleep(_POLL)
    except RuntimeError as e:     # the store's host went away: it failed first and said why
        raise DSV4Error(f"rank {rank} lost the rendezvous store (the process hosting it exited): "
                        f"{_first_line(e)}") from None


def _difference(rank: int, mine: dict, other: int, theirs: dict) -> str:
    key = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
    label = "WORLD_SIZE" if key == "world_size" else key
    return (f"ranks were started differently: rank {rank} has {label}={mine.get(key)!r} but rank {other} has "
            f"{label}={theirs.get(key)!r}")


def _first_line(e: BaseException) -> str:
    """The gist of a c10d error: its first line, without the source-location prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
