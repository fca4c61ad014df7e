"""The CUDA backend's Triton kernels: checked on CPU through Triton's interpreter at small shapes, and on a GPU when
one is present."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'dsv4[cuda]')")

CHECK = r"""
import torch
from dsv4.kernels import quant_gemm as qg
from dsv4.backends.canonical import ops as C
from dsv4.formats import quantize_weight_fp8, quantize_weight_fp4
device = "{device}"
torch.manual_seed(0)
for m, n, k in [(1, 96, 256), (5, 130, 384), (19, 64, 128)]:
    x = torch.randn(m, k) * 2
    x[:, 128:256] *= 1e-6                         # a block below the amax floor: e4m3 subnormals
    x[0, :64] = 0.0                               # zeros and exact ties of the e4m3 grid
    x[-1, 1:5] = torch.tensor([1.0625, -1.0625, 0.0048828125, 448.0])
    x = x.bfloat16()
    for make in (quantize_weight_fp8, quantize_weight_fp4):
        w, s = make(torch.randn(n, k) * k ** -0.5)
        ref = C.quant_linear(x, w, s)
        exact = qg.quant_linear("exact")(x.to(device), w.to(device), s.to(device)).cpu()
        assert torch.equal(exact.view(torch.int16), ref.view(torch.int16)), ("exact", m, n, k, make.__name__)
        for kind in ("fast", "invariant"):
            out = qg.quant_linear(kind)(x.to(device), w.to(device), s.to(device)).cpu().float()
            err = ((out - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert err < 2e-2, (kind, m, n, k, make.__name__, err)
experts = [quantize_weight_fp4(torch.randn(64, 256) * 0.06) for _ in range(4)]
W, S = torch.stack([w for w, _ in experts]), torch.stack([s for _, s in experts])
counts, x = torch.tensor([2, 0, 17, 1]), (torch.randn(20, 256)).bfloat16()
ref = C.grouped_quant_linear(x, counts, W, S)
out = qg.grouped_quant_linear("exact")(x.to(device), counts, W.to(device), S.to(device)).cpu()
assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), "grouped exact"
print("ok")
"""


def _run(device: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", CHECK.format(device=device)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


@needs_triton
def test_quant_gemm_kernels_match_the_reference_in_the_triton_interpreter():
    import numpy
    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton 3.6's interpreter fails with numpy >= 2.4 (size-1 array to scalar)")
    proc = _run("cpu", {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_quant_gemm_kernels_on_the_gpu_exact_bits_and_fast_tolerance():
    proc = _run("cuda", {})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
