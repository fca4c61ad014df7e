"""The `cuda` backend (NVIDIA GPUs): Triton kernels where they exist, the canonical composite for every other op.

Kernels are registered in preference order per op, each with the strongest level it declares (checked by
`dsv4 verify`): the fast tensor-core GEMM first, then the exact fused GEMM, then the canonical composite (exact, the
floor every backend starts from; see docs/porting.md).
"""
from __future__ import annotations

import importlib.util

from dsv4.backends.expert_parallel import add_expert_parallel_kernels
from dsv4.backends.levels import Level
from dsv4.backends.registry import Backend, Registry, add_canonical_kernels


def unavailable_reason() -> str | None:
    import torch

    if not torch.backends.cuda.is_built():
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: pip install 'dsv4[cuda]'"
    return None


def register(registry: Registry) -> None:
    backend = registry.add_backend(Backend(
        name="cuda", device_types=("cuda",), probe=unavailable_reason,
        description="NVIDIA GPUs: Triton kernels, canonical composite as the exact floor"))
    if importlib.util.find_spec("triton") is not None:
        from dsv4.kernels import quant_gemm

        from dsv4.kernels.compress_pool import compress_pool
        from dsv4.kernels.mhc_pre import mhc_pre

        for kind, level in (("fast", Level.FAST), ("invariant", Level.BATCH_INVARIANT), ("exact", Level.EXACT)):
            backend.add("quant_linear", quant_gemm.quant_linear(kind), level, f"triton_{kind}")
            backend.add("grouped_quant_linear", quant_gemm.grouped_quant_linear(kind), level, f"triton_{kind}")
        # written once in kernels/ for this backend and Triton-Ascend alike
        backend.add("compress_pool", compress_pool, Level.BATCH_INVARIANT, "triton")
        backend.add("mhc_pre", mhc_pre, Level.FAST, "triton")
    add_expert_parallel_kernels(backend)
    add_canonical_kernels(backend)
