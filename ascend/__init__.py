"""The `npu` backend: Huawei Ascend NPUs through torch-npu. Not yet run on Ascend hardware: see docs/ascend.md.

Kernels come from `mapping.ENTRIES` (torch-npu fused operators, the integer exact GEMM, Triton-Ascend kernels when
Triton-Ascend is usable), registered for the chip generation found here, fastest first, then the canonical
composite of every op at `exact`. Ops without an Ascend kernel therefore run as the canonical composite, which
`mapping.NO_OPERATOR` and the capability tables in docs/ascend.md state op by op.
"""
from __future__ import annotations

from dsv4.backends.npu import device
from dsv4.backends.npu.device import unavailable_reason
from dsv4.backends.npu.distributed import distributed_env
from dsv4.backends.registry import Backend, Registry, add_canonical_kernels

__all__ = ["build_backend", "distributed_env", "register", "unavailable_reason"]


def build_backend(chip: str | None, triton: bool) -> Backend:
    """The npu backend for a chip generation (None: none visible here) with or without Triton-Ascend kernels."""
    from dsv4.backends.npu import mapping   # imported here so `python -m dsv4.backends.npu.mapping` runs it once

    backend = Backend(name="npu", device_types=("npu",), probe=device.unavailable_reason,
                      description="Ascend NPUs via torch-npu: fused operators, integer exact GEMM, Triton-Ascend "
                                  "kernels, canonical composite as the exact floor")
    for entry in mapping.entries_for(chip, triton):
        backend.add(entry.op, entry.load(), entry.level, entry.kernel)
    add_canonical_kernels(backend)
    return backend


def register(registry: Registry) -> None:
    registry.add_backend(build_backend(device.detect_chip(), device.triton_ascend_available()))
