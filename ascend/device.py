"""Which Ascend device is here: the probe that names what is missing, the chip generation, Triton-Ascend.

The probe checks, in order, what a user has to fix in order: torch-npu installed, the CANN toolkit set up, torch-npu
importable, an NPU visible, a supported chip. Each reason is one sentence that says how to fix it. torch-npu itself
honours ASCEND_RT_VISIBLE_DEVICES (the CANN runtime hides the other devices), so `--device npu:0` is the first
visible NPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

# Chip generations, as vllm-ascend names them (vllm_ascend/utils.py, AscendDeviceType and check_ascend_device_type).
A2, A3, A5 = "910B", "910C", "950"
CHIPS = (A2, A3, A5)
CHIP_NAMES = {A2: "Atlas A2 (Ascend 910B)", A3: "Atlas A3 (Ascend 910C)", A5: "Ascend 950 (A5)"}
_SOC_RANGES = ((220, 225, A2), (250, 255, A3), (260, 260, A5))   # torch_npu.npu.get_soc_version()

ASCEND_ROOT = Path("/usr/local/Ascend")                           # CANN's default install prefix
CANN_ENV_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")       # set by CANN's set_env.sh


def chip_for_soc(soc_version: int) -> str | None:
    """The chip generation of a SoC version number, None for chips dsv4 does not support (310P, older)."""
    return next((chip for low, high, chip in _SOC_RANGES if low <= soc_version <= high), None)


def _torch_npu():
    """The imported torch_npu module (raises whatever its import raises)."""
    return importlib.import_module("torch_npu")


def unavailable_reason() -> str | None:
    """None when dsv4 can run on an NPU here, else which of torch-npu, CANN, a visible NPU or a supported chip is
    missing, and how to get it."""
    if importlib.util.find_spec("torch_npu") is None:
        return (f"torch-npu is not installed: install the CANN toolkit first, then the torch-npu release built for "
                f"torch {torch.__version__.split('+')[0]} (pip install torch-npu==<that version>, or "
                f"pip install 'dsv4[npu]'); see docs/ascend.md")
    if not any(os.environ.get(name) for name in CANN_ENV_VARS):
        scripts = sorted(ASCEND_ROOT.glob("*/set_env.sh")) if ASCEND_ROOT.is_dir() else []
        if scripts:
            return f"the CANN toolkit is installed but not set up in this shell: source {scripts[0]}"
        return (f"the CANN toolkit was not found (ASCEND_HOME_PATH is unset and {ASCEND_ROOT} has no set_env.sh): "
                f"install the CANN toolkit and the kernels package for your chip, then source its set_env.sh")
    try:
        torch_npu = _torch_npu()
    except Exception as e:
        return (f"torch-npu failed to import ({type(e).__name__}: {e}); its release must match torch "
                f"{torch.__version__.split('+')[0]} and CANN's set_env.sh must be sourced")
    if not torch_npu.npu.is_available() or torch_npu.npu.device_count() == 0:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return ("no Ascend NPU is visible (check the driver with npu-smi info"
                + (f"; ASCEND_RT_VISIBLE_DEVICES={visible!r} selects which NPUs this process sees)" if visible
                   is not None else ")"))
    soc = torch_npu.npu.get_soc_version()
    if chip_for_soc(soc) is None:
        return (f"this Ascend chip (SoC version {soc}) is not supported: dsv4 runs on "
                + ", ".join(CHIP_NAMES[c] for c in CHIPS))
    return None


def detect_chip() -> str | None:
    """The chip generation of the visible NPUs, None when there is no usable NPU here."""
    if unavailable_reason() is not None:
        return None
    return chip_for_soc(_torch_npu().npu.get_soc_version())


def triton_ascend_available() -> bool:
    """Whether `import triton` is Triton-Ascend with an NPU target (the check Triton-Ascend's own tutorials use:
    triton.runtime.driver.active.get_current_target().backend == "npu")."""
    if importlib.util.find_spec("triton") is None or detect_chip() is None:
        return False
    try:
        import triton

        return triton.runtime.driver.active.get_current_target().backend == "npu"
    except Exception:
        return False
