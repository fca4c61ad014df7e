"""The heterogeneous KV cache, paged: what DeepSeek-V4 keeps between steps, and where each piece lives.

Per layer (and per MTP layer):
- the window ring: the last `window_size` KV vectors of each sequence slot (position p in ring row p % window);
- compressed layers (ratio 4 or 128): the compressed KV entries, in a pool of fixed-size blocks shared by all
  sequences; a block covers CACHE_BLOCK positions, so it holds CACHE_BLOCK / ratio entries of a layer (64 for CSA,
  2 for HCA). A per-sequence block table maps a sequence's logical block i to a physical block; one table serves
  every layer (as vLLM's V4 layout does), so memory is taken block by block as sequences grow, and a configured
  context of up to 1M tokens costs nothing until it is used;
- the compressors' open-block state (fp32 rows of the previous and the current, partly filled block, with their
  scores), per sequence slot;
- CSA layers: the lightning indexer's compressed keys, paged like the entries, and its own compressor state.

Storage is what the model has already rounded (dsv4.formats): the non-RoPE part of every attention KV vector is
FP8 e4m3 codes with a power-of-two scale per KV_FP8_BLOCK values, the RoPE part bf16; indexer keys are FP4 e2m1
codes with a scale per FP4_BLOCK. Decoding gives back the bf16 values bit for bit (tests/test_cache.py), at half
(KV) and a third (indexer keys) of the bf16 bytes.

Row layout of a layer's KV storage: the ring rows of every slot first (slot * window + p % window), then the
pool (pool_base + block * entries_per_block + entry % entries_per_block). Physical block 0 is the null block:
unassigned table entries point at it, so a kernel may read any table entry without a bounds check (what it reads
there is never visible). Slot `slots` (one past the last) is the scratch slot that pads a batch to a fixed size.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsv4 import formats
from dsv4.backends.canonical.ops import encode_rows as canonical_encode
from dsv4.backends.contracts import FP4_BLOCK, KV_FP8_BLOCK
from dsv4.config import CACHE_BLOCK, CSA_RATIO, ModelConfig
from dsv4.errors import DSV4Error

NULL_BLOCK = 0           # the physical block that unassigned table entries point at
Encoder = Callable[[torch.Tensor, str, int], tuple[torch.Tensor, torch.Tensor]]   # the encode_rows op


@dataclass
class PagedRows:
    """Cached vectors of one layer in their storage format: quantised `codes` with block scales, then an unquantised
    bf16 `tail` (the RoPE dims of attention KV; empty for indexer keys). Row r decodes to
    cat(codes[r] * scale[r] per `block` values, tail[r]) in bf16."""
    codes: torch.Tensor          # [R, n] float8_e4m3fn ('fp8') or [R, n/2] uint8 packed e2m1 ('fp4')
    scale: torch.Tensor          # [R, n / block] fp32 powers of two
    tail: torch.Tensor           # [R, t] bf16
    fmt: str
    block: int
    pool_base: int               # first pool row (the ring rows come before it)
    entries_per_block: int       # compressed entries per cache block (0: no pool)

    @classmethod
    def empty(cls, ring_rows: int, pool_rows: int, quantised: int, tail: int, fmt: str, block: int,
              entries_per_block: int, device: torch.device) -> "PagedRows":
        rows = ring_rows + pool_rows
        width = quantised if fmt == "fp8" else quantised // 2
        dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.uint8
        return cls(codes=torch.zeros(rows, width, dtype=dtype, device=device),
                   scale=torch.ones(rows, quantised // block, device=device),
                   tail=torch.zeros(rows, tail, dtype=torch.bfloat16, device=device),
                   fmt=fmt, block=block, pool_base=ring_rows, entries_per_block=entries_per_block)

    @classmethod
    def holding(cls, values: torch.Tensor, fmt: str, block: int, tail: int, pool_base: int = 0,
                entries_per_block: int = 0) -> "PagedRows":
        """Storage holding values [R, width] bf16 (already on the storage grid) in rows 0 .. R-1."""
        rows, width = values.shape
        store = cls.empty(pool_base, rows - pool_base, width - tail, tail, fmt, block, entries_per_block,
                          values.device)
        store.write(torch.arange(rows, device=values.device), values)
        return store

    def to(self, device: torch.device | str) -> "PagedRows":
        return dataclasses.replace(self, codes=self.codes.to(device), scale=self.scale.to(device),
                                   tail=self.tail.to(device))

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def width(self) -> int:
        """The decoded vector's length."""
        return self.scale.shape[1] * self.block + self.tail.shape[1]

    def entry_rows(self, block_table: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Storage rows of compressed entries: block_table [b, nb] int32, entries [b, ...] int64 logical entry ids
        (-1: none, kept as -1). An entry past the table's width maps into the null block."""
        epb = self.entries_per_block
        b = entries.shape[0]
        flat = entries.reshape(b, -1).clamp(min=0)
        logical = flat // epb
        inside = logical < block_table.shape[1]
        blocks = block_table.long().gather(1, torch.where(inside, logical, 0))
        rows = self.pool_base + torch.where(inside, blocks, NULL_BLOCK) * epb + flat % epb
        return torch.where(entries.reshape(b, -1) >= 0, rows, -1).view(entries.shape)

    def write(self, rows: torch.Tensor, values: torch.Tensor, encode: Encoder | None = None) -> None:
        """Store bf16 vectors values [..., width] at rows [...] (values already rounded to the storage grid), their
        quantised part encoded by `encode` (the `encode_rows` op; default: the canonical one)."""
        n = self.scale.shape[1] * self.block
        flat_rows, flat = rows.reshape(-1), values.reshape(-1, values.shape[-1])
        codes, scale = (encode or canonical_encode)(flat[:, :n].contiguous(), self.fmt, self.block)
        self.codes[flat_rows] = codes
        self.scale[flat_rows] = scale
        self.tail[flat_rows] = flat[:, n:].to(torch.bfloat16)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """The bf16 vectors [..., width] stored at rows [...] (every index must be a valid row)."""
        flat = rows.reshape(-1)
        codes = self.codes[flat]
        if self.fmt == "fp4":
            codes = formats.unpack_fp4_codes(codes)
        values = formats.dequantize_blocks(codes, self.scale[flat], self.fmt, self.block)
        return torch.cat([values, self.tail[flat]], dim=-1).view(*rows.shape, self.width)


@dataclass
class CompressorState:
    """A compressor's open-block rows per sequence slot; its completed entries live in the layer's paged rows."""
    kv: torch.Tensor        # [slots + 1, (1+overlap)*ratio, width] fp32: rows of the previous block, then the current
    score: torch.Tensor     # same shape; scores with the position bias added, -inf where nothing was written
    entries: PagedRows      # where completed entries are stored
    journal: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # while speculating: each step's fed (kv, score)

    @classmethod
    def empty(cls, slots: int, ratio: int, head_dim: int, entries: PagedRows,
              device: torch.device) -> "CompressorState":
        overlap = ratio == CSA_RATIO
        rows, width = (1 + overlap) * ratio, (1 + overlap) * head_dim
        return cls(kv=torch.zeros(slots, rows, width, device=device),
                   score=torch.full((slots, rows, width), float("-inf"), device=device), entries=entries)

    def reset(self, slot: int) -> None:
        self.kv[slot] = 0
        self.score[slot] = float("-inf")


@dataclass
class LayerCache:
    kv: PagedRows                            # window ring rows, then the compressed entries' pool (ratio > 0)
    window: int
    compressor: CompressorState | None       # ratio > 0; its entries are `kv`'s pool
    indexer: CompressorState | None          # ratio == 4; its entries: FP4 indexer keys, pool only


def kv_rows(config: ModelConfig, ring_rows: int, pool_rows: int, entries_per_block: int,
            device: torch.device) -> PagedRows:
    """Attention KV storage: FP8 codes for the non-RoPE dims, bf16 for the RoPE dims."""
    return PagedRows.empty(ring_rows, pool_rows, config.nope_head_dim, config.rope_head_dim, "fp8", KV_FP8_BLOCK,
                           entries_per_block, device)


def index_key_rows(config: ModelConfig, pool_rows: int, entries_per_block: int, device: torch.device) -> PagedRows:
    """Indexer key storage: FP4 codes for every dim (the keys are Hadamard-rotated, then FP4-rounded whole)."""
    return PagedRows.empty(0, pool_rows, config.index_head_dim, 0, "fp4", FP4_BLOCK, entries_per_block, device)


@dataclass
class Step:
    """What one forward step needs besides the tokens: positions, cache slots and their block tables."""
    start: torch.Tensor        # [b] int64, position of the first new token of each sequence
    slots: torch.Tensor        # [b] int64, cache slots of the sequences
    cache: "KVCache"
    n_new: int                 # s, new tokens per sequence
    block_table: torch.Tensor = field(default=None)   # [b, nb] int32; default: the slots' whole rows of the table

    def __post_init__(self) -> None:
        if self.block_table is None:
            self.block_table = self.cache.block_table[self.slots]

    @functools.cached_property
    def positions(self) -> torch.Tensor:   # [b, s], computed once per step
        return self.start[:, None] + torch.arange(self.n_new, device=self.start.device)


class BlockAllocator:
    """Physical cache blocks 1 .. n-1 (block 0 is the null block), handed out and taken back on the host.

    A block may have several owners (a slot, and the prefix cache that shares it with later slots: dsv4.serve):
    each owner holds one reference, and the block is free again when the last one gives it back."""

    def __init__(self, n_blocks: int):
        if n_blocks < 2:
            raise DSV4Error(f"the KV cache needs at least 2 blocks (one is the null block), got {n_blocks}")
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks - 1, 0, -1))     # pop() hands out the lowest id first
        self._refs = [0] * n_blocks

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise DSV4Error(f"the KV cache is full: {n} more block(s) of {CACHE_BLOCK} positions needed, "
                            f"{len(self._free)} free of {self.n_blocks - 1}; give it more memory or fewer sequences")
        blocks = [self._free.pop() for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def hold(self, blocks: list[int]) -> None:
        """One more owner for blocks already handed out."""
        for block in blocks:
            self._refs[block] += 1

    def owners(self, block: int) -> int:
        return self._refs[block]

    def give_back(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds any more is free."""
        freed = []
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                freed.append(block)
        self._free.extend(reversed(freed))


class KVCache:
    """Cache for `slots` concurrent sequences of up to config.max_seq_len tokens, for every layer and MTP layer.

    `blocks` physical blocks of CACHE_BLOCK positions back the compressed entries of all sequences (default: enough
    for every slot to hold a full-length sequence). A slot takes blocks as its sequence grows (`reserve`) and gives
    them back when a new sequence starts there (`reset`)."""

    def __init__(self, config: ModelConfig, slots: int, device: torch.device | str, blocks: int | None = None):
        self.config, self.slots, self.device = config, slots, torch.device(device)
        self.max_blocks = blocks_for(config.max_seq_len) + 1   # +1: the open entry past a full context maps somewhere
        self.allocator = BlockAllocator(blocks if blocks is not None else slots * blocks_for(config.max_seq_len) + 1)
        n_blocks = self.allocator.n_blocks
        self.block_table = torch.full((slots + 1, self.max_blocks), NULL_BLOCK, dtype=torch.int32, device=device)
        self._blocks: list[list[int]] = [[] for _ in range(slots + 1)]
        self.layers: list[LayerCache] = []
        ring = (slots + 1) * config.window_size
        for ratio in config.compress_ratios:
            epb = CACHE_BLOCK // ratio if ratio else 0
            kv = kv_rows(config, ring, n_blocks * epb, epb, self.device)
            compressor = indexer = None
            if ratio:
                compressor = CompressorState.empty(slots + 1, ratio, config.head_dim, kv, self.device)
            if ratio == CSA_RATIO:
                keys = index_key_rows(config, n_blocks * epb, epb, self.device)
                indexer = CompressorState.empty(slots + 1, ratio, config.index_head_dim, keys, self.device)
            self.layers.append(LayerCache(kv, config.window_size, compressor, indexer))

    @property
    def scratch_slot(self) -> int:
        """The slot that pads a batch: it owns no blocks, so its compressed writes land in the null block."""
        return self.slots

    def blocks_of(self, slot: int) -> list[int]:
        return list(self._blocks[slot])

    def reserve(self, slot: int, length: int) -> None:
        """Make sure `slot` has the blocks for positions 0 .. length-1."""
        if slot == self.scratch_slot:
            return
        have = self._blocks[slot]
        need = blocks_for(length) - len(have)
        if need > 0:
            new = self.allocator.take(need)
            self.block_table[slot, len(have):len(have) + need] = torch.tensor(new, dtype=torch.int32)
            have.extend(new)

    def reset(self, slot: int) -> None:
        """Forget everything slot `slot` held: its blocks go back to the pool and its open-block state is cleared."""
        self.allocator.give_back(self._blocks[slot])
        self._blocks[slot] = []
        self.block_table[slot] = NULL_BLOCK
        for layer in self.layers:
            for state in (layer.compressor, layer.indexer):
                if state is not None:
                    state.reset(slot)

    # -- prefix sharing (dsv4.serve.prefix): a slot may start from blocks and state another sequence left behind --
    def share(self, slot: int, index: int, block: int) -> None:
        """Make `block` (a complete block of a shared prefix, one more reference to it) the slot's logical block
        `index`, in place of the one it had there (given back) or as its next one. A sequence never writes into
        blocks before its first new position, so sharing is safe."""
        self.allocator.hold([block])
        have = self._blocks[slot]
        if index < len(have):
            self.allocator.give_back([have[index]])
            have[index] = block
        else:
            assert index == len(have), "a shared block follows the slot's blocks"
            have.append(block)
        self.block_table[slot, index] = block

    def slot_state(self, slot: int) -> list[torch.Tensor]:
        """Views of what `slot` keeps outside its blocks that a continuation from a block boundary reads, layer by
        layer: the window ring rows (codes, scales, RoPE dims) and, for the overlapping (CSA) compressors, the
        previous compression block's rows and scores. At a boundary the current compression block is empty (every
        ratio divides CACHE_BLOCK), so its state rows are never read before they are written again."""
        views = []
        for ratio, layer in zip(self.config.compress_ratios, self.layers):
            ring = slice(slot * layer.window, (slot + 1) * layer.window)
            views += [layer.kv.codes[ring], layer.kv.scale[ring], layer.kv.tail[ring]]
            if ratio == CSA_RATIO:
                for state in (layer.compressor, layer.indexer):
                    views += [state.kv[slot, :ratio], state.score[slot, :ratio]]
        return views

    def block_rows(self, block: int) -> list[torch.Tensor]:
        """Views of physical block `block`'s pool rows in every layer: compressed KV entries and indexer keys."""
        views = []
        for layer in self.layers:
            stores = [layer.kv] if layer.compressor is not None else []
            stores += [layer.indexer.entries] if layer.indexer is not None else []
            for store in stores:
                rows = slice(store.pool_base + block * store.entries_per_block,
                             store.pool_base + (block + 1) * store.entries_per_block)
                views += [store.codes[rows], store.scale[rows], store.tail[rows]]
        return views

    def table_width(self, length: int) -> int:
        """Block-table columns a step over sequences of up to `length` positions reads: the blocks they cover, rounded
        up to a power of two (so decode graphs are captured for a few widths) and at most the whole table. Kernels
        that scan every entry a table addresses (the indexer, HCA attention) then scale with the context in use,
        not with the configured one."""
        return min(self.max_blocks, 1 << (blocks_for(length) - 1).bit_length())

    def step(self, start: list[int], slots: list[int], n_new: int) -> Step:
        """The Step for `n_new` tokens of each sequence in `slots` from positions `start`, with blocks reserved."""
        for slot, first in zip(slots, start):
            self.reserve(slot, first + n_new)
        slot_ids = torch.tensor(slots, device=self.device)
        width = self.table_width(max(start) + n_new)
        return Step(start=torch.tensor(start, device=self.device), slots=slot_ids, cache=self, n_new=n_new,
                    block_table=self.block_table[slot_ids, :width])


def blocks_for(length: int) -> int:
    """Cache blocks covering positions 0 .. length-1."""
    return -(-length // CACHE_BLOCK)
