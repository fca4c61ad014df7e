"""Multi-process NPU runs: the collective backend, and the environment that pins its reductions per level.

HCCL reads HCCL_DETERMINISTIC when it initialises: false (default), true (deterministic reductions) or strict
(order-preserving reductions, the same order whatever the message size; CANN environment variable reference,
HCCL_DETERMINISTIC). LCCL, the collective library inside CANN's ATB operators, has LCCL_DETERMINISTIC; vllm-ascend
sets both for its batch-invariant mode (vllm_ascend/batch_invariant.py). The multi-process launcher must merge
`distributed_env(level)` into every rank's environment before the rank imports torch_npu or calls
torch.distributed.init_process_group(backend=BACKEND).
"""
from __future__ import annotations

from dsv4.backends.levels import Level

BACKEND = "hccl"   # torch.distributed backend name that torch-npu registers


def distributed_env(level: Level | str) -> dict[str, str]:
    """Environment variables a rank needs at `level`: none at fast; deterministic reductions at deterministic;
    order-preserving ones at batch-invariant and exact, where a reduction must not depend on how many tokens a
    step carries (HCCL may pick its algorithm by message size)."""
    level = Level.parse(level)
    if level == Level.FAST:
        return {}
    hccl = "true" if level == Level.DETERMINISTIC else "strict"
    return {"HCCL_DETERMINISTIC": hccl, "LCCL_DETERMINISTIC": "1"}
