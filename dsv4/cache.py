"""The heterogeneous KV cache: per layer and per sequence slot, what DeepSeek-V4 keeps between steps.

- every layer: a ring buffer of the last `window_size` KV vectors (position p at slot p % window), bf16;
- compressed layers (ratio 4 or 128): the compressed KV entries in block order, bf16, and the compressor's block
  state (fp32 rows of the previous and the current, partly filled block, with their scores);
- CSA layers (ratio 4): the lightning indexer's compressed keys and its own compressor state.

A slot is reset when a new sequence takes it, so no state leaks from one request to the next (the reference never
resets its compressor state between prompts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.config import ModelConfig


@dataclass
class CompressorState:
    kv: torch.Tensor        # [slots, (1+overlap)*ratio, width] fp32: rows of the previous block, then the current one
    score: torch.Tensor     # same shape; scores with the position bias added, -inf where nothing was written
    entries: torch.Tensor   # [slots, max_seq_len // ratio, head_dim] bf16: completed compressed entries

    @classmethod
    def empty(cls, slots: int, ratio: int, head_dim: int, max_seq_len: int, device: torch.device) -> "CompressorState":
        overlap = ratio == 4
        rows, width = (1 + overlap) * ratio, (1 + overlap) * head_dim
        return cls(kv=torch.zeros(slots, rows, width, device=device),
                   score=torch.full((slots, rows, width), float("-inf"), device=device),
                   entries=torch.zeros(slots, max_seq_len // ratio, head_dim, dtype=torch.bfloat16, device=device))

    def reset(self, slot: int) -> None:
        self.kv[slot] = 0
        self.score[slot] = float("-inf")


@dataclass
class LayerCache:
    window: torch.Tensor                     # [slots, window_size, head_dim] bf16 ring buffer
    compressor: CompressorState | None       # ratio > 0
    indexer: CompressorState | None          # ratio == 4


class KVCache:
    """Cache rows for `slots` concurrent sequences of up to config.max_seq_len tokens, for every layer and MTP."""

    def __init__(self, config: ModelConfig, slots: int, device: torch.device | str):
        self.config, self.slots, self.device = config, slots, torch.device(device)
        self.layers: list[LayerCache] = []
        for layer_id, ratio in enumerate(config.compress_ratios):
            window = torch.zeros(slots, config.window_size, config.head_dim, dtype=torch.bfloat16, device=device)
            compressor = indexer = None
            if ratio:
                compressor = CompressorState.empty(slots, ratio, config.head_dim, config.max_seq_len, self.device)
            if ratio == 4:
                indexer = CompressorState.empty(slots, 4, config.index_head_dim, config.max_seq_len, self.device)
            self.layers.append(LayerCache(window, compressor, indexer))

    def reset(self, slot: int) -> None:
        """Forget everything slot `slot` held: a new sequence starts there."""
        for layer in self.layers:
            for state in (layer.compressor, layer.indexer):
                if state is not None:
                    state.reset(slot)

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += layer.window.nbytes
            for state in (layer.compressor, layer.indexer):
                if state is not None:
                    total += state.kv.nbytes + state.score.nbytes + state.entries.nbytes
        return total
