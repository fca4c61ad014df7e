"""How many programs a launch should have: enough to keep every multiprocessor of the device streaming.

Decode-sized kernels (a few rows against a large weight) are latency-bound unless the grid covers the chip several
times over, so the GEMM and linear kernels size their tiles and K splits from this target rather than from a number
fixed to one GPU. Under Triton's CPU interpreter there is no device to ask; the H100/H200 count stands in.
"""
from __future__ import annotations

import functools

import torch

PROGRAMS_PER_SM = 2          # resident programs per multiprocessor the launch sizing aims at
INTERPRETER_SMS = 132        # an H100's / H200's multiprocessors, for launches sized under the interpreter


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def target_programs(device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """Programs that one launch should have on `device` (`per_sm` per multiprocessor)."""
    return per_sm * _multiprocessors(device)
