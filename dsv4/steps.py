"""A step's inputs (`Rows`), and steps captured as CUDA graphs (`StepGraph`): a step function over one batch bucket's
rows is captured once and replayed with new rows copied into its static inputs, so a step costs one launch instead
of one per kernel.

The engine captures one graph per kind of step and shape: plain decode per (bucket, block-table width), a
speculative round (dsv4.speculative) per (bucket, width, drafts). Eager execution pads rows to the same buckets, so
replay and eager give the same bits at every level.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from dsv4.errors import DSV4Error

if TYPE_CHECKING:
    from dsv4.engine import Request

Outputs = TypeVar("Outputs")


def sampling_settings(requests: list[Request], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors of the requests' (temperature, top_p, request id), and `pad` rows of greedy defaults."""
    return (torch.tensor([r.temperature for r in requests] + [0.0] * pad),
            torch.tensor([r.top_p for r in requests] + [1.0] * pad),
            torch.tensor([r.request_id for r in requests] + [0] * pad, dtype=torch.int64))


@dataclass
class Rows:
    """A step's per-sequence inputs, padded to the step's batch size with rows on the cache's scratch slot: tokens
    [b, s] at positions start .. start+s-1 of the sequences in `slots`, sampled with each request's settings; `left`:
    the tokens each sequence may still emit (a speculative round keeps no position past them)."""
    tokens: torch.Tensor        # [b, s] int64
    start: torch.Tensor         # [b] int64
    slots: torch.Tensor         # [b] int64
    temperature: torch.Tensor   # [b] fp32
    top_p: torch.Tensor         # [b] fp32
    request: torch.Tensor       # [b] int64: the request ids that key the sampling draws
    left: torch.Tensor          # [b] int64; 0 on padding rows

    @classmethod
    def of(cls, tokens: list[list[int]], start: list[int], slots: list[int], requests: list[Request], size: int,
           scratch: int, left: list[int] | None = None, width: int | None = None) -> "Rows":
        """Host rows of these sequences (tokens: `width` per sequence), then padding up to `size` rows."""
        pad = size - len(slots)
        long = dict(dtype=torch.int64)
        width = len(tokens[0]) if width is None else width
        return cls(torch.tensor(tokens + [[0] * width] * pad, **long).view(size, width),
                   torch.tensor(start + [0] * pad, **long),
                   torch.tensor(slots + [scratch] * pad, **long), *sampling_settings(requests, pad),
                   torch.tensor((left if left is not None else [1] * len(slots)) + [0] * pad, **long))

    def idle(self, scratch: int) -> "Rows":
        """Rows of the same shapes, every one padding."""
        return Rows.of([], [], [], [], self.slots.shape[0], scratch, width=self.tokens.shape[1])

    def to(self, device: torch.device) -> "Rows":
        return Rows(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def sampling(self, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature, top_p, request id) per row, each row `repeat` times in a row (a row's positions in turn)."""
        return tuple(t[:, None].expand(-1, repeat).reshape(-1) for t in (self.temperature, self.top_p, self.request))


class StepGraph(Generic[Outputs]):
    """`step(rows)` captured as a CUDA graph over static rows. Warm-up (it compiles kernels and builds RoPE tables)
    and capture run on `idle` rows, every one on the cache's scratch slot, so neither touches a live sequence."""

    def __init__(self, step: Callable[[Rows], Outputs], idle: Rows, pool, device: torch.device):
        self.rows = idle.to(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step(self.rows)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = step(self.rows)
        except RuntimeError as e:
            raise DSV4Error(f"a decode step cannot be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                            f"a kernel of this op table synchronises with the host: run with --eager") from None

    def __call__(self, rows: Rows) -> Outputs:
        """Replay on `rows` (host tensors of the captured shapes); the outputs are the graph's static tensors, valid
        until the next replay."""
        for field in dataclasses.fields(rows):
            getattr(self.rows, field.name).copy_(getattr(rows, field.name))
        self.graph.replay()
        return self.outputs
