"""The Triton-Ascend kernels (kernels/) under Triton's CPU interpreter, against the canonical composite.

The interpreter must be chosen before triton is first imported (triton.language's own jit functions are built then),
and other tests import triton early, so the kernels run in child processes started with TRITON_INTERPRET=1, one per
kernel; this file is their script too. The interpreter executes the kernels' triton.language code with numpy: it proves
their indexing, masking and arithmetic, not how Triton-Ascend compiles them (nothing here has run on an NPU).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

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


def excess(op: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    """> 0 where |out - ref| exceeds the tolerance of op's contract."""
    from dsv4.backends import contracts

    c = contracts.CONTRACTS[op]
    return float(((out.double() - ref.double()).abs() - (c.atol + c.rtol * ref.double().abs())).max())


def measure_compress_pool() -> dict:
    """Run in a child: the kernel against the canonical op, and one entry alone against the same entry in a batch."""
    from dsv4.backends.canonical import ops as canonical
    from dsv4.kernels.compress_pool import compress_pool

    g = torch.Generator().manual_seed(0)
    results = {}
    for rows, channels in COMPRESS_SHAPES:
        kv = torch.randn(3, rows, channels, generator=g)
        score = torch.randn(3, rows, channels, generator=g) * 3
        score[1, : rows // 2] = float("-inf")                        # rows not yet filled weigh 0
        out = compress_pool(kv, score)
        results[f"compress_pool_{rows}x{channels}_excess"] = excess("compress_pool", out, canonical.compress_pool(kv, score))
        results[f"compress_pool_{rows}x{channels}_alone"] = torch.equal(compress_pool(kv[2:3], score[2:3]), out[2:3])
    return results


def measure_mhc_pre() -> dict:
    """Run in a child: the kernel against the canonical op, and one token alone against the same token in a batch."""
    from dsv4.backends.canonical import ops as canonical
    from dsv4.kernels.mhc import mhc_pre

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 1, 4, 256, generator=g) * 2).bfloat16()
    fn = torch.randn(24, 1024, generator=g) * 0.05
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    got = mhc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    ref = canonical.mhc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    alone = mhc_pre(x[1:2], fn, scale, base, 1e-6, 1e-6, 20)
    return {"mhc_pre_post_excess": excess("mhc_pre", got[1], ref[1]),
            "mhc_pre_comb_excess": excess("mhc_pre", got[2], ref[2]),
            "mhc_pre_y_ulps": float(((got[0].float() - ref[0].float()).abs() / bf16_ulp(ref[0])).max()),
            "mhc_pre_shapes": [list(t.shape) for t in got] == [list(t.shape) for t in ref],
            "mhc_pre_alone": all(torch.equal(a, b[1:2]) for a, b in zip(alone, got))}


MEASURES = {"compress_pool": measure_compress_pool, "mhc_pre": measure_mhc_pre}


@pytest.fixture(scope="module")
def measured() -> dict:
    """Every kernel measured at once, each in its own child process of one thread (one core each)."""
    def child(kernel: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-P", __file__, kernel], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(len(MEASURES)) as pool:
        procs = list(pool.map(child, MEASURES))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {key: value for proc in procs for key, value in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


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
    print(json.dumps(MEASURES[sys.argv[1]]()))
