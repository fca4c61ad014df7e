"""The `npu` backend (Huawei Ascend through torch-npu). Not yet run on Ascend hardware: see docs/ascend.md."""
from __future__ import annotations

import importlib.util
import os

from dsv4.backends.registry import Backend, Registry, add_canonical_kernels


def unavailable_reason() -> str | None:
    """Which of torch-npu, CANN and a visible NPU is missing, and how to get it."""
    if importlib.util.find_spec("torch_npu") is None:
        return ("torch-npu is not installed: pip install 'dsv4[npu]' (torch-npu matching your torch version; it also "
                "needs the CANN toolkit, see docs/ascend.md)")
    if not (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
            or os.path.isdir("/usr/local/Ascend")):
        return "the CANN toolkit was not found: install CANN and source its set_env.sh (ASCEND_HOME_PATH is unset)"
    try:
        import torch_npu  # noqa: F401
        import torch
    except Exception as e:
        return f"torch-npu failed to import: {type(e).__name__}: {e}"
    if not torch.npu.is_available() or torch.npu.device_count() == 0:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return "no Ascend NPU is visible" + (f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible is not None else "")
    return None


def register(registry: Registry) -> None:
    backend = registry.add_backend(Backend(
        name="npu", device_types=("npu",), probe=unavailable_reason,
        description="Ascend NPUs via torch-npu: fused operators, TileLang-Ascend/Triton-Ascend kernels"))
    add_canonical_kernels(backend)
