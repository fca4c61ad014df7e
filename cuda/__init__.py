"""The `cuda` backend (NVIDIA GPUs). Until a fused kernel is registered for an op, the op runs as the canonical
composite on the GPU, which meets `exact` (see docs/porting.md: every backend starts from that floor)."""
from __future__ import annotations

from dsv4.backends.registry import Backend, Registry, add_canonical_kernels


def unavailable_reason() -> str | None:
    import torch

    if not torch.backends.cuda.is_built():
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


def register(registry: Registry) -> None:
    backend = registry.add_backend(Backend(
        name="cuda", device_types=("cuda",), probe=unavailable_reason,
        description="NVIDIA GPUs: Triton/TileLang kernels, canonical composite as the exact floor"))
    add_canonical_kernels(backend)
