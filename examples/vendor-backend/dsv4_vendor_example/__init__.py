"""An example dsv4 backend plugin, written as a template for vendors.

It serves device type `cpu` so that it runs on any machine; a vendor replaces that with its torch device type
(`npu`, `xpu`, `privateuseone`, ...). The recipe (docs/porting.md):
1. a probe that says why the backend cannot run here (or None),
2. the vendor's own kernels, each declaring the strongest level it meets, registered first (preference order),
3. the canonical composite last: the exact floor for every op the vendor has not written yet, and the kernel the
   registry falls to at a level the vendor kernels do not declare.
"""
from __future__ import annotations

from dsv4.backends.registry import Backend, Registry, add_canonical_kernels

from dsv4_vendor_example import kernels


def unavailable_reason() -> str | None:
    """None when the backend can run here, else why not and how to fix it.

    A real vendor checks, in this order and with the fix in the message: its torch extension imports (missing
    package), its driver/toolkit is found, and a device is visible (see dsv4's cuda/ and ascend/ probes). The
    example runs on the CPU, which is always there.
    """
    return None


def register(registry: Registry) -> None:
    """Entry point `dsv4.backends: example`, called once by the registry's discovery."""
    backend = registry.add_backend(Backend(
        name="example", device_types=("cpu",), probe=unavailable_reason,
        description="example vendor plugin: canonical floor + its own rms_norm (exact) and swiglu (fast)"))
    # Own kernels first: the registry takes the first kernel of an op that declares the requested level.
    backend.add("rms_norm", kernels.rms_norm, "exact", "torch_rms_norm")   # follows the canonical order
    backend.add("swiglu", kernels.swiglu, "fast", "torch_silu")            # torch's silu: not the canonical bits
    # Then the floor: every op at `exact`, so at `exact` swiglu resolves to the canonical one.
    add_canonical_kernels(backend)
