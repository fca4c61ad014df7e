"""The `fast` expert-parallel combine: each rank sums its own slots in fp32, and an all-reduce adds the partial sums.

It moves [T, d] fp32 per rank instead of the [T*k, d] bf16 rows the canonical `ep_combine` gathers (less for k > 2),
but the collective then does arithmetic: the order of the fp32 additions depends on the collective's algorithm and on
the number of ranks, so a result can differ from one process, or from another degree, in the last bit before the
single bf16 rounding. It declares `fast` only; every stricter level resolves `ep_combine` to the canonical all-gather
(docs/expert-parallel.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.backends.levels import Level
from dsv4.backends.registry import Backend

if TYPE_CHECKING:
    from dsv4.parallel import ExpertGroup


def ep_combine_all_reduce(local_out: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, k: int,
                          shared: torch.Tensor, group: ExpertGroup | None) -> torch.Tensor:
    """Per token, the fp32 sum of this rank's slot outputs (in any order), summed over the ranks by an all-reduce,
    plus the shared expert; one cast to bf16."""
    mine = order if group is None else order[group.own_rows(counts)]
    partial = torch.zeros(shared.shape, dtype=torch.float32, device=shared.device)
    partial.index_add_(0, mine // k, local_out.float())
    if group is not None:
        group.all_reduce(partial)
    return (partial + shared.float()).to(torch.bfloat16)


def add_expert_parallel_kernels(backend: Backend) -> None:
    """Register the all-reduce combine; call before add_canonical_kernels so that `fast` prefers it."""
    backend.add("ep_combine", ep_combine_all_reduce, Level.FAST, "all_reduce")
