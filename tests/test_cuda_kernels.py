"""The CUDA backend's Triton kernels: checked on CPU through Triton's interpreter at small shapes, and on a GPU when
one is present."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'dsv4[cuda]')")

CHECK = Path(__file__).parent / "scripts" / "check_kernels.py"


def _run(device: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", str(CHECK), device], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})


@needs_triton
def test_every_triton_kernel_matches_the_reference_in_the_triton_interpreter():
    import numpy
    import triton

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:2])
    if version(triton.__version__) < (3, 9) and version(numpy.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with numpy >= 2.4 (size-1 array to scalar); "
                    "Triton 3.9 works with it")
    proc = _run("cpu", {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_every_triton_kernel_on_the_gpu_exact_bits_and_fast_tolerance():
    proc = _run("cuda", {})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
