"""The `cuda` backend (NVIDIA GPUs): Triton kernels for the hot ops, the canonical composite for the rest.

Kernels are registered in preference order per op, each with the strongest level it declares (checked by
`dsv4 verify`): tensor-core kernels first, then the exact kernels, then the canonical composite (exact, the floor
every backend starts from; see docs/porting.md). Kernel sources live in dsv4.kernels (shared with Triton-Ascend).

Ops without a Triton kernel here, and why: moe_dispatch (a stable sort: torch's CUB radix sort is the right tool),
sample (once per step, on [b, vocab]) and ep_combine (a collective).
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


def _add_triton_kernels(backend: Backend) -> None:
    from dsv4.kernels import indexer, linear, pointwise, quant_gemm, quantize, rms_norm, sparse_attention
    from dsv4.kernels.compress_pool import compress_pool
    from dsv4.kernels.mhc import mhc_head, mhc_pre

    for kind, level in (("fast", Level.FAST), ("invariant", Level.BATCH_INVARIANT), ("exact", Level.EXACT)):
        backend.add("quant_linear", quant_gemm.quant_linear(kind), level, f"triton_{kind}")
        backend.add("grouped_quant_linear", quant_gemm.grouped_quant_linear(kind), level, f"triton_{kind}")
    # 'split' (tensor cores, flash-decoding splits whose bounds depend on each token's list alone): batch-invariant
    for kind, level in (("split", Level.BATCH_INVARIANT), ("exact", Level.EXACT)):
        backend.add("sparse_attention", sparse_attention.sparse_attention(kind), level, f"triton_{kind}")
        backend.add("hca_attention", sparse_attention.hca_attention(kind), level, f"triton_{kind}")
    backend.add("linear", linear.cublas_linear, Level.FAST, "cublas")
    exact = {"linear": linear.linear, "moe_gate": linear.moe_gate, "indexer_topk": indexer.indexer_topk,
             "rms_norm": rms_norm.rms_norm, "rope": pointwise.rope, "swiglu": pointwise.swiglu,
             "compress_pool": compress_pool, "mhc_pre": mhc_pre, "mhc_head": mhc_head, "mhc_post": pointwise.mhc_post,
             "moe_combine": pointwise.moe_combine, "fake_quant": quantize.fake_quant,
             "encode_rows": quantize.encode_rows, "hadamard": quantize.hadamard}
    for op, fn in exact.items():   # the contract's canonical order: one kernel for every level
        backend.add(op, fn, Level.EXACT, "triton_exact")


def register(registry: Registry) -> None:
    backend = registry.add_backend(Backend(
        name="cuda", device_types=("cuda",), probe=unavailable_reason,
        description="NVIDIA GPUs: Triton kernels, canonical composite as the exact floor"))
    if importlib.util.find_spec("triton") is not None:
        _add_triton_kernels(backend)
    add_expert_parallel_kernels(backend)
    add_canonical_kernels(backend)
