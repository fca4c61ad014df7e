"""Expert parallelism on CPU with gloo: the same bits at every degree, per-rank loading, and failures that end every
process with one line instead of a hang.

Multi-process runs go through the real entry points in fresh processes: `dsv4 run --nproc N`, torchrun, or ranks
started by hand with torchrun's variables. Every wait has a timeout, so no test can hang.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dsv4.checkpoint as checkpoint
from dsv4.checkpoint import load_checkpoint
from dsv4.errors import DSV4Error

from conftest import same_bits
from test_cli import dsv4_at_once

DSV4 = shutil.which("dsv4") or os.path.join(os.path.dirname(sys.executable), "dsv4")
PROMPTS = ("--prompt", "def add(a, b):", "--prompt", "x")
TIMEOUT = 120
FAST_TOLERANCE = 0.05     # fast level: max |logit - reference| <= this * max |reference|


def dsv4(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DSV4, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                          env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The process failed with exactly one `error:` line, the last on stderr, and no traceback."""
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]) and "Traceback" not in proc.stderr, \
        proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], world_sizes: list[int]) -> list[subprocess.Popen]:
    """Start one process per entry of `world_sizes` as rank i with WORLD_SIZE=world_sizes[i], as torchrun would."""
    port = str(free_port())
    return [subprocess.Popen([DSV4, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
            for rank, size in enumerate(world_sizes)]


def finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


# -- loading --------------------------------------------------------------------------------------------------------
class _RecordingHandle:
    """A safetensors handle that records which tensors' data is read."""

    def __init__(self, handle, reads: list[str]):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.inner = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, key):
        return self.inner.get_slice(key)

    def get_tensor(self, key):
        self.reads.append(key)
        return self.inner.get_tensor(key)


def test_a_rank_reads_only_its_own_experts_and_holds_them_stacked(tiny_dir, monkeypatch):
    _, full, _ = load_checkpoint(tiny_dir)
    reads: list[str] = []
    real_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: _RecordingHandle(real_open(*a, **k), reads))
    config, shard, _ = load_checkpoint(tiny_dir, expert_shard=(1, 4))          # experts 2 and 3 of 8

    experts_read = {int(m[2]) for key in reads if (m := checkpoint._EXPERT.match(key))}
    assert experts_read == {2, 3}
    assert set(reads) >= {name for name in checkpoint.official_layout(config) if not checkpoint._EXPERT.match(name)}
    assert shard.keys() == full.keys()
    for name, tensor in shard.items():
        if checkpoint._STACKED_EXPERT.match(name):
            assert tensor.shape[0] == 2 and torch.equal(tensor.view(torch.uint8), full[name][2:4].view(torch.uint8))
        else:
            assert tensor.dtype == full[name].dtype and torch.equal(tensor, full[name]), name


@pytest.mark.parametrize("size, message", [(3, "cannot be split evenly over 3 processes"),
                                           (16, "16 processes but the model has only 8 routed experts")])
def test_a_split_that_does_not_divide_the_experts_is_refused_by_the_loader(tiny_dir, size, message):
    with pytest.raises(DSV4Error, match=message):
        load_checkpoint(tiny_dir, expert_shard=(0, size))


# -- the same bits at every degree ----------------------------------------------------------------------------------
def generation(model: Path, level: str = "exact") -> tuple[str, ...]:
    return ("run", "--model", str(model), "--determinism", level, "--temperature", "0.8", "--seed", "5",
            "--max-new-tokens", "5", "--quiet", *PROMPTS)


@pytest.fixture(scope="module")
def single_process(tiny_dir, tmp_path_factory):
    """The single-process CPU reference: stdout and per-token logits."""
    out = tmp_path_factory.mktemp("reference") / "logits.safetensors"
    proc = dsv4(*generation(tiny_dir), "--logits-out", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, load_file(out)


@pytest.mark.parametrize("launcher", ["nproc 2", "nproc 4", "torchrun 2"])
def test_exact_generation_has_the_single_process_bits_at_every_degree(tiny_dir, single_process, tmp_path, launcher):
    kind, n = launcher.split()
    out = tmp_path / "logits.safetensors"
    args = [*generation(tiny_dir), "--logits-out", str(out)]
    if kind == "nproc":
        proc = dsv4(*args, "--nproc", n)
    else:   # from an empty folder: the repository's `cuda/` must not shadow torch's module of that name
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n,
                               "-m", "dsv4.cli", *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stdout, logits = single_process
    assert proc.stdout == stdout                      # rank 0 alone prints, the same text
    got = load_file(out)
    assert got.keys() == logits.keys()
    for name in logits:
        assert same_bits(got[name], logits[name]), name



def test_exact_generation_of_the_small_preset_has_the_single_process_bits_with_4_ranks(tmp_path):
    """The small preset (16 experts, 8 layers) too: 4 ranks of 4 experts each reproduce one process bit for bit."""
    args = ("run", "--preset", "small", "--determinism", "exact", "--max-new-tokens", "3", "--quiet",
            "--prompt", "def f(x):")
    one = dsv4(*args, "--logits-out", str(tmp_path / "one.safetensors"))
    four = dsv4(*args, "--nproc", "4", "--logits-out", str(tmp_path / "four.safetensors"))
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    assert one.stdout == four.stdout
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "four.safetensors")
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)

def test_fast_generation_agrees_with_one_fast_process_within_tolerance(tiny_dir, tmp_path):
    """`fast` resolves ep_combine to the all-reduce; the first generated token's logits (the prefill) must be within
    FAST_TOLERANCE of one process's at `fast` (the same kernels but the combine). (Later tokens may legitimately
    diverge at `fast`.)"""
    one, out = tmp_path / "one.safetensors", tmp_path / "logits.safetensors"
    alone, proc = dsv4_at_once((*generation(tiny_dir, "fast"), "--logits-out", str(one)),
                               (*generation(tiny_dir, "fast"), "--nproc", "4", "--logits-out", str(out)))
    assert alone.returncode == 0 and proc.returncode == 0, alone.stderr + proc.stderr
    got = load_file(out)
    for name, ref in load_file(one).items():
        error = (got[name][0] - ref[0]).abs().max() / ref[0].abs().max()
        assert error <= FAST_TOLERANCE, f"{name}: the logits differ by {error:.3g} of their largest"


EP_COMBINE_SCRIPT = """
import os
import torch
from dsv4.backends.canonical import ops
from dsv4.backends.expert_parallel import ep_combine_all_reduce
from dsv4.parallel import join

with join("cpu", {}, 30) as group:
    g = torch.Generator().manual_seed(0)
    for t, k, e, d, hot in ((33, 4, 8, 64, None), (9, 2, 8, 64, range(4))):   # hot: the only experts routed to
        scores = torch.rand(t, e, generator=g)
        if hot is not None:
            scores[:, hot.stop:] = -1                                     # rank 1 of 2 gets no rows at all
        experts = scores.argsort(dim=-1, descending=True)[:, :k]
        expert_out = (torch.randn(t * k, d, generator=g) * 3).to(torch.bfloat16)
        shared = torch.randn(t, d, generator=g).to(torch.bfloat16)
        order, counts = ops.moe_dispatch(experts, e)
        local = expert_out[group.own_rows(counts)]
        want = ops.moe_combine(expert_out, order, k, shared)
        exact = ops.ep_combine(local, order, counts, k, shared, group)
        fast = ep_combine_all_reduce(local, order, counts, k, shared, group)
        assert torch.equal(exact.view(torch.int16), want.view(torch.int16)), "exact differs"
        err = ((fast.float() - want.float()).abs() / (want.float().abs() + 1e-2)).max().item()
        assert err <= 2 ** -7, f"fast differs by {err}"
print("ok", flush=True)
os._exit(0)   # as launched ranks do (dsv4.cli): skip the interpreter teardown that gloo's threads can abort
"""


def test_ep_combine_kernels_across_two_processes_even_when_a_rank_has_no_rows(tmp_path):
    script = tmp_path / "ep_combine_check.py"
    script.write_text(EP_COMBINE_SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-P", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    for proc in finish(procs):
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- bad launches ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, message", [(3, "cannot be split evenly over 3 processes"),
                                        (16, "16 processes but the model has only 8 routed experts")])
def test_nproc_that_does_not_divide_the_experts_is_refused_before_any_process_starts(tiny_dir, n, message):
    started = time.monotonic()
    one_line_error(dsv4("run", "--model", str(tiny_dir), "--nproc", str(n)), message)
    assert time.monotonic() - started < 30


def test_under_torchrun_a_bad_split_ends_every_rank_with_the_same_error(tiny_dir):
    procs = finish(start_ranks(["run", "--model", str(tiny_dir), "--quiet", "--dist-timeout", "30"], [3, 3, 3]))
    assert {one_line_error(p, "cannot be split evenly over 3 processes") for p in procs} == \
        {"error: the 8 routed experts cannot be split evenly over 3 processes: use a process count that divides 8"}


def test_ranks_started_with_different_world_sizes_all_fail_at_the_rendezvous(tiny_dir):
    started = time.monotonic()
    procs = finish(start_ranks(["run", "--model", str(tiny_dir), "--quiet", "--dist-timeout", "60"], [2, 4]))
    for p in procs:
        one_line_error(p, "ranks were started differently", "WORLD_SIZE=2", "WORLD_SIZE=4")
    assert time.monotonic() - started < 30           # at once, not after the timeout


def test_a_rank_that_never_comes_is_given_up_after_the_timeout(tiny_dir):
    procs = finish(start_ranks(["run", "--model", str(tiny_dir), "--quiet", "--dist-timeout", "2"], [2]))
    one_line_error(procs[0], "rank(s) 1 did not join within 2 s")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 is not in [0, "),
])
def test_an_incomplete_or_inconsistent_launch_environment_is_named(tiny_dir, env, message):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([DSV4, "run", "--model", str(tiny_dir), "--quiet"], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**clean, **env})
    one_line_error(proc, message)


def test_nproc_that_disagrees_with_the_launchers_world_size_is_refused(tiny_dir):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    one_line_error(dsv4("run", "--model", str(tiny_dir), "--nproc", "4", env=env),
                   "--nproc 4 does not match WORLD_SIZE=2")


# -- ranks that die or hang -----------------------------------------------------------------------------------------
def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of one rank started by `launcher`, found through /proc."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


def _launch_then(signal_number: int, tiny_dir, *extra: str) -> tuple[subprocess.CompletedProcess, float, list[int]]:
    """Start a long `dsv4 run --nproc 2`, send rank 1 a signal once rank 0 is generating, and wait for the end."""
    launcher = subprocess.Popen([DSV4, "run", "--model", str(tiny_dir), "--nproc", "2", "--max-new-tokens", "400",
                                 "--quiet", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ranks = [_rank_pid(launcher, 0), _rank_pid(launcher, 1)]
        first = launcher.stdout.read(len("def fibonacci(n):") + 1)     # the prompt and a first token are out
        assert first.startswith("def fibonacci(n):"), first
        os.kill(ranks[1], signal_number)
        signalled = time.monotonic()
        out, err = launcher.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(launcher.args, launcher.returncode, first + out, err), \
            time.monotonic() - signalled, ranks
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"        # a zombie has ended too


def test_a_rank_that_dies_ends_every_process_with_one_error(tiny_dir):
    proc, seconds, ranks = _launch_then(signal.SIGKILL, tiny_dir)
    one_line_error(proc, "rank 1 died (killed by SIGKILL)")
    assert seconds < 30 and all(_gone(pid) for pid in ranks)


def test_a_rank_that_hangs_is_given_up_after_the_timeout(tiny_dir):
    proc, seconds, ranks = _launch_then(signal.SIGSTOP, tiny_dir, "--dist-timeout", "3")
    one_line_error(proc, "rank 0 lost the other ranks in the expert-parallel", "Timed out")
    assert 3 <= seconds < 30 and all(_gone(pid) for pid in ranks)


# -- benchmark ------------------------------------------------------------------------------------------------------
def test_bench_moe_times_dispatch_and_combine_against_the_raw_collectives(tmp_path):
    out = tmp_path / "moe.json"
    proc = dsv4("bench", "moe", "--nproc", "2", "--preset", "tiny", "--tokens", "8,32", "--iters", "2",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    for piece in ("dispatch (local)", "raw all_gather", "ep_combine exact: total", "raw all_reduce fp32",
                  "ep_combine fast: total"):
        assert proc.stdout.count(piece) == 2, proc.stdout
    assert out.exists() and '"ranks": 2' in out.read_text()
