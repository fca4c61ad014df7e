"""`dsv4 run` and `dsv4 backends` as a user meets them: output, progress, and one-line errors for bad input."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsv4.progress import Progress


def dsv4(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed console script in a fresh process, as a user would."""
    exe = shutil.which("dsv4") or os.path.join(os.path.dirname(sys.executable), "dsv4")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def dsv4_at_once(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Independent `dsv4` commands, each in its own fresh process, all started at once (`dsv4 run` takes one CPU
    thread: two runs keep two cores busy)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: dsv4(*args), commands))


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr   # progress lines may precede
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_run_with_no_arguments_generates_text_and_reports_tokens_per_second():
    proc = dsv4("run", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def fibonacci(n):") and len(proc.stdout) > len("def fibonacci(n):")
    assert "prefill" in proc.stderr and "tok/s" in proc.stderr and "load: " in proc.stderr


def test_run_is_deterministic_across_processes_with_a_seed(tiny_dir):
    args = ("run", "--model", str(tiny_dir), "--temperature", "0.8", "--seed", "3", "--max-new-tokens", "6", "--quiet")
    first, second = dsv4_at_once(args, args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_backends_lists_every_backend_with_availability_and_ops():
    proc = dsv4("backends")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "cpu" in out and "available" in out
    if not torch.cuda.is_available():
        assert "cuda" in out and "unavailable: " in out
    assert "npu" in out and "torch-npu is not installed" in out
    assert "sparse_attention" in out and "canonical(exact)" in out
    assert "reference: canonical composites in plain torch" in out            # each backend's description


def _phases(progress: Progress) -> None:
    for done in range(1, 4):
        progress("load", done, 3)
    for total in (5, 2):                        # two prompts: the prefill phase starts again
        for done in range(1, total + 1):
            progress("prefill", done, total)
    progress("decode", 4, 12)                   # ends early (end of sequence)
    progress.close()


def test_progress_off_a_terminal_is_a_line_when_a_phase_starts_and_one_when_it_ends():
    out = io.StringIO()
    _phases(Progress(stream=out, tty=False))
    assert out.getvalue().splitlines() == ["load: 1/3", "load: 3/3", "prefill: 1/5", "prefill: 5/5", "prefill: 1/2",
                                           "prefill: 2/2", "decode: 4/12"]


def test_progress_on_a_terminal_draws_a_bar_per_phase_and_clears_it_and_quiet_prints_nothing():
    out = io.StringIO()
    _phases(Progress(stream=out, tty=True))
    text = out.getvalue()
    assert all(f"{phase}:" in text for phase in ("load", "prefill", "decode")) and "|" in text and "\n" not in text
    quiet = io.StringIO()
    _phases(Progress(enabled=False, stream=quiet, tty=True))
    assert quiet.getvalue() == ""


def test_unknown_preset_names_the_choices():
    _one_line_error(dsv4("run", "--preset", "huge"), "unknown preset 'huge'", "tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    _one_line_error(dsv4("run", "--device", "cuda"), "backend 'cuda' is not usable here")


def test_prompt_longer_than_the_context_is_refused(tiny_dir):
    _one_line_error(dsv4("run", "--model", str(tiny_dir), "--prompt", "x" * 600), "exceeds the context length")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_with_a_missing_tensor_names_it(tiny_dir, tmp_path):
    bad = _copy(tiny_dir, tmp_path / "ckpt")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.0.attn.wkv.weight"]
    # drop it from the file too, so the file and index agree and only the tensor is missing
    from safetensors.torch import load_file, save_file
    shard = bad / next(iter(set(index["weight_map"].values())))
    tensors = load_file(shard)
    tensors.pop("layers.0.attn.wkv.weight", None)
    save_file(tensors, shard)
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    (bad / "dsv4-manifest.json").unlink()     # a checkpoint from elsewhere: the structural check, not the checksum
    _one_line_error(dsv4("run", "--model", str(bad)), "layers.0.attn.wkv.weight", "missing")


def test_truncated_checkpoint_file_names_the_file(tiny_dir, tmp_path):
    bad = _copy(tiny_dir, tmp_path / "ckpt")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _one_line_error(dsv4("run", "--model", str(bad)), shard.name)


def test_unknown_determinism_level_is_refused():
    proc = dsv4("run", "--determinism", "bitwise")
    assert proc.returncode != 0 and "bitwise" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_directory_is_named(tmp_path):
    _one_line_error(dsv4("run", "--model", str(tmp_path / "nowhere")), "nowhere")


@pytest.mark.parametrize("flag, threads", [((), 1), (("--threads", "3"), 3)], ids=["cpu-default", "given"])
def test_run_sets_the_cpu_threads(tiny_dir, monkeypatch, flag, threads):
    from click.testing import CliRunner

    from dsv4.cli import main

    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    result = CliRunner().invoke(main, ["run", "--model", str(tiny_dir), "--max-new-tokens", "1", "--quiet", *flag])
    assert result.exit_code == 0, result.output
    assert chosen == [threads]
