"""Non-finite logits: which layer made them, found after the fact so that the forward pass never checks.

The model's forward adds no host synchronisation (decode steps can be captured in CUDA graphs). The engine reads
one finiteness flag per row together with the sampled tokens; only when a flag is down does `non_finite_error`
re-run that row's sequence alone, eagerly, with a check after every module, and name the first one whose output
holds NaN or Inf. Corrupt weights reproduce on the re-run; the message says so when the re-run stays finite.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.errors import DSV4Error

if TYPE_CHECKING:
    from dsv4.model import Transformer


class NonFiniteLogits(DSV4Error):
    """The logits of batch row `row` hold NaN or Inf (raised by the engine before they reach a sampled token)."""

    def __init__(self, row: int):
        super().__init__(f"the logits of batch row {row} hold NaN or Inf")
        self.row = row


def first_non_finite(model: Transformer, device: torch.device, tokens: list[int],
                     prefill_chunk: int | None = None) -> str | None:
    """Prefill `tokens` alone in a fresh cache with a check on every module's output: the name of the first module,
    in execution order, whose output is not finite ("head" when only the logits are), or None if all stay finite."""
    from dsv4.engine import Engine

    found: list[str] = []

    def check(name: str):
        def hook(module, inputs, output) -> None:
            if not found and isinstance(output, torch.Tensor) and output.is_floating_point() \
                    and not bool(torch.isfinite(output).all()):
                found.append(name)
        return hook

    handles = [m.register_forward_hook(check(name)) for name, m in model.named_modules() if name]
    try:
        logits = Engine(model, device, max_batch=1, prefill_chunk=prefill_chunk).prefill(tokens, 0)
    finally:
        for handle in handles:
            handle.remove()
    if not found and not bool(torch.isfinite(logits).all()):
        found.append("head")
    return found[0] if found else None


def non_finite_error(model: Transformer, device: torch.device, tokens: list[int],
                     prefill_chunk: int | None = None) -> DSV4Error:
    """The error for logits that are not finite after the sequence `tokens`, naming the first layer that is not."""
    module = first_non_finite(model, device, tokens, prefill_chunk)
    what = f"the model's logits hold NaN or Inf after a sequence of {len(tokens)} tokens"
    if module is None:
        return DSV4Error(f"{what}, yet a re-run of that sequence stayed finite in every layer: a non-deterministic "
                         f"kernel fault; try --determinism exact or another backend")
    layer = ".".join(module.split(".")[:2]) if module.startswith(("layers.", "mtp.")) else module
    inside = f" (first in {module})" if module != layer else ""
    return DSV4Error(f"{what}: the first layer whose output is not finite is {layer}{inside}; its weights are likely "
                     f"corrupt (`dsv4 checkpoint verify DIR` checks the files against their manifest)")
