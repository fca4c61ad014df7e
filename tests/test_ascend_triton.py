"""The Triton-Ascend kernels (kernels/) under Triton's CPU interpreter, against the canonical composite.

The interpreter must be chosen before triton is first imported (triton.language's own jit functions are built then),
and other tests import triton early, so the kernels run in one child process started with TRITON_INTERPRET=1; this
file is that child's script too. The interpreter executes the kernels' triton.language code with numpy: it proves
their indexing, masking and arithmetic, not how Triton-Ascend compiles them (nothing here has run on an NPU).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
# (rows R, channels): one channel block; R = 128 (HCA's ratio) over two full blocks; R and channels of no block size
COMPRESS_SHAPES = ((8, 128), (128, 256), (5, 100))
SHAPE_IDS = [f"{rows}x{channels}" for rows, channels in COMPRESS_SHAPES]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at x (8 significant bits): 2^(floor(log2 |x|) - 7)."""
    _, exponent = torch.frexp(x.float().abs().clamp_min(2.0 ** -126))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def measure() -> dict:
    """Run in the child: each kernel against the canonical op, and one row alone against the same row in a batch."""
    from dsv4.backends import contracts
    from dsv4.backends.canonical import ops as canonical
    from dsv4.kernels.compress_pool import compress_pool
    from dsv4.kernels.mhc import mhc_pre

    def excess(op, out, ref):   # > 0 where |out - ref| exceeds the contract's tolerance
        c = contracts.CONTRACTS[op]
        return float(((out.double() - ref.double()).abs() - (c.atol + c.rtol * ref.double().abs())).max())

    g = torch.Generator().manual_seed(0)
    results = {}
    for rows, channels in COMPRESS_SHAPES:
        kv = torch.randn(3, rows, channels, generator=g)
        score = torch.randn(3, rows, channels, generator=g) * 3
        score[1, : rows // 2] = float("-inf")                        # rows not yet filled weigh 0
        out = compress_pool(kv, score)
        results[f"compress_pool_{rows}x{channels}_excess"] = excess("compress_pool", out, canonical.compress_pool(kv, score))
        results[f"compress_pool_{rows}x{channels}_alone"] = torch.equal(compress_pool(kv[2:3], score[2:3]), out[2:3])
    x = (torch.randn(2, 1, 4, 256, generator=g) * 2).bfloat16()
    fn = torch.randn(24, 1024, generator=g) * 0.05
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    got = mhc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    ref = canonical.mhc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    results["mhc_pre_post_excess"] = excess("mhc_pre", got[1], ref[1])
    results["mhc_pre_comb_excess"] = excess("mhc_pre", got[2], ref[2])
    results["mhc_pre_y_ulps"] = float(((got[0].float() - ref[0].float()).abs() / bf16_ulp(ref[0])).max())
    results["mhc_pre_shapes"] = [list(t.shape) for t in got] == [list(t.shape) for t in ref]
    alone = mhc_pre(x[1:2], fn, scale, base, 1e-6, 1e-6, 20)
    results["mhc_pre_alone"] = all(torch.equal(a, b[1:2]) for a, b in zip(alone, got))
    return results


@pytest.fixture(scope="module")
def measured() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-P", __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPE_IDS)
def test_compress_pool_kernel_meets_the_contract_with_empty_rows(measured, shape):
    assert measured[f"compress_pool_{shape}_excess"] <= 0


@pytest.mark.parametrize("shape", SHAPE_IDS)
def test_compress_pool_kernel_gives_a_row_the_same_bits_alone_and_in_a_batch(measured, shape):
    assert measured[f"compress_pool_{shape}_alone"]


def test_mhc_pre_kernel_post_and_comb_meet_the_contract(measured):
    assert measured["mhc_pre_shapes"]
    assert measured["mhc_pre_post_excess"] <= 0 and measured["mhc_pre_comb_excess"] <= 0


def test_mhc_pre_kernel_collapse_is_within_one_bfloat16_ulp(measured):
    # Not the contract's fp32 tolerance, which is below one bf16 ulp of y: see docs/ascend.md.
    assert measured["mhc_pre_y_ulps"] <= 1


def test_mhc_pre_kernel_gives_a_token_the_same_bits_alone_and_in_a_batch(measured):
    assert measured["mhc_pre_alone"]


if __name__ == "__main__":
    print(json.dumps(measure()))
