"""The CUDA backend's Triton kernels, one test per kernel case of tests/scripts/check_kernels.py: on CPU through
Triton's interpreter at small shapes, and on a GPU when one is present. Exact kernels must give the reference's
bits; fast kernels must stay within their op's tolerance."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).parent / "scripts" / "check_kernels.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None
CHECK_PROCESSES = 2       # a CI machine's cores; more processes would spend more on imports than they save
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'dsv4[cuda]')")


def _case_names() -> list[str]:
    if not HAS_TRITON:
        return []
    spec = importlib.util.spec_from_file_location("check_kernels", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CASES)


CASE_NAMES = _case_names()


def _expected(name: str) -> str:
    """What a case must report: tolerance for the kernels that only promise it, the reference's bits otherwise."""
    tolerant = re.search(r"\b(fast|invariant|split|cublas)\b", name)      # the kernel kinds that promise tolerance
    return "within tolerance" if tolerant else "bit-identical"


def _run(device: str, env: dict) -> dict[str, dict]:
    """Every case, in CHECK_PROCESSES child processes of one thread each taking a run of consecutive cases (the
    interpreter keeps one core busy per process; with one thread each they do not fight over the cores)."""
    def check(names: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-P", str(CHECK), device, *names], capture_output=True, text=True,
                              timeout=1500, env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    with ThreadPoolExecutor(CHECK_PROCESSES) as pool:
        n = len(CASE_NAMES)
        procs = list(pool.map(check, [CASE_NAMES[i * n // CHECK_PROCESSES:(i + 1) * n // CHECK_PROCESSES]
                                      for i in range(CHECK_PROCESSES)]))
    results = {r["case"]: r for proc in procs for r in map(json.loads, filter(None, proc.stdout.splitlines()))}
    results["_stderr"] = "\n".join(proc.stderr[-3000:] for proc in procs)
    return results


def _check(results: dict, name: str) -> None:
    assert name in results, f"the check process ended before case {name!r}: {results['_stderr']}"
    r = results[name]
    assert r["ok"], f"{r['detail']}\n{r.get('traceback', '')}"
    assert r["detail"].startswith(_expected(name)), r["detail"]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    import numpy
    import triton

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:2])
    if version(triton.__version__) < (3, 9) and version(numpy.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with numpy >= 2.4 (size-1 array to scalar); "
                    "Triton 3.9 works with it")
    return _run("cpu", {"TRITON_INTERPRET": "1"})


@pytest.fixture(scope="module")
def on_gpu() -> dict:
    return _run("cuda", {})


@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_kernel_matches_the_reference_in_the_interpreter(name, interpreted):
    _check(interpreted, name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_kernel_on_the_gpu_matches_the_reference(name, on_gpu):
    _check(on_gpu, name)
