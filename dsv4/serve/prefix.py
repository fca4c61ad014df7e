"""The prefix cache in memory: complete prompt blocks kept after their request, so a later prompt that starts with
the same tokens adopts them instead of computing them again.

One node per cache block (CACHE_BLOCK positions) of a prompt, keyed by a hash chain over the block-aligned token
blocks (key_i = sha256(key_{i-1}, tokens of block i)): equal keys mean equal prefixes. A node holds one reference
to its physical block (dsv4.cache.BlockAllocator) and a host copy of the slot state at the block's end
(KVCache.slot_state: window ring, compressors' open-block rows and scores). Restoring the blocks of a chain and
the state of its last node continues the sequence bit for bit, because the scheduler prefills in block-aligned
chunks: the computation after the boundary is the same whether the prefix was cached or computed.

Leaves that no running sequence shares are evicted, least recently used first, when admission needs blocks.
With a PrefixStore (dsv4.serve.store) every new node is also written to disk and a chain continues from disk
where memory ends.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch

from dsv4.cache import KVCache
from dsv4.config import CACHE_BLOCK
from dsv4.serve.store import FORMAT_VERSION, PrefixStore


def model_key(manifest: bytes, config: dict, level: str, kernels: dict[str, str] | None) -> str:
    """What makes cached KV valid: the weights (the checkpoint's checksum manifest), the config, the cache file
    format and the numerics (the determinism level; below `exact` also the kernels, whose bits may differ)."""
    text = json.dumps({"manifest": hashlib.sha256(manifest).hexdigest(), "config": config, "format": FORMAT_VERSION,
                       "level": level, "kernels": kernels}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def chain_keys(prompt: list[int]) -> list[str]:
    """The keys of the prompt's complete blocks."""
    keys, key = [], b""
    for i in range(len(prompt) // CACHE_BLOCK):
        block = prompt[i * CACHE_BLOCK:(i + 1) * CACHE_BLOCK]
        key = hashlib.sha256(key + struct.pack(f"<{CACHE_BLOCK}q", *block)).digest()
        keys.append(key.hex())
    return keys


@dataclass(eq=False)          # nodes are compared by identity
class Node:
    key: str
    parent: "Node | None"
    block: int                       # physical block; the node holds one reference to it
    state: list[torch.Tensor]        # host copy of the slot state at the block's end
    children: int = 0
    last_use: int = 0


@dataclass
class PrefixStats:
    lookups: int = 0                 # requests prefilled
    prompt_tokens: int = 0           # their prompt tokens
    memory_tokens: int = 0           # prompt tokens found in memory
    disk_tokens: int = 0             # prompt tokens found on disk
    memory_hits: int = 0             # requests with at least one block from memory
    disk_hits: int = 0               # requests with at least one block from disk
    evicted_blocks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Match:
    nodes: list[Node] = field(default_factory=list)
    from_disk: int = 0               # how many of the nodes were read from disk

    @property
    def tokens(self) -> int:
        return len(self.nodes) * CACHE_BLOCK


class PrefixCache:
    def __init__(self, cache: KVCache, store: PrefixStore | None = None):
        self.cache, self.store = cache, store
        self.nodes: dict[str, Node] = {}
        self.stats = PrefixStats()
        self._clock = 0

    def match(self, prompt: list[int], keys: list[str]) -> Match:
        """The longest cached prefix of `prompt` (chain `keys`) that leaves at least one token to compute, from
        memory and then from disk. Nodes read from disk join the memory cache."""
        usable = (len(prompt) - 1) // CACHE_BLOCK
        found = Match()
        parent = None
        for i, key in enumerate(keys[:usable]):
            node = self.nodes.get(key)
            if node is None:
                block = prompt[i * CACHE_BLOCK:(i + 1) * CACHE_BLOCK]
                node = self._from_disk(key, block, parent, found.nodes)
                if node is None:
                    break
                found.from_disk += 1
            found.nodes.append(node)
            parent = node
        self._clock += 1
        for node in found.nodes:
            node.last_use = self._clock
        return found

    def restore(self, slot: int, nodes: list[Node], first: int) -> None:
        """Continue `slot` from the prefix `nodes`: their blocks from index `first` on shared into its table (the
        slot's own blocks there given back), the last node's state copied in."""
        for index, node in enumerate(nodes[first:], start=first):
            self.cache.share(slot, index, node.block)
        for view, saved in zip(self.cache.slot_state(slot), nodes[-1].state):
            view.copy_(saved)

    def record(self, prompt_tokens: int, memory_tokens: int, disk_tokens: int) -> None:
        """Count one request's prompt and the tokens it took from memory and from disk."""
        s = self.stats
        s.lookups += 1
        s.prompt_tokens += prompt_tokens
        s.memory_tokens += memory_tokens
        s.disk_tokens += disk_tokens
        s.memory_hits += memory_tokens > 0
        s.disk_hits += disk_tokens > 0

    def insert(self, slot: int, prompt: list[int], keys: list[str], index: int) -> None:
        """Remember block `index` of the prompt in `slot`, whose prefill has just reached the block's end."""
        key = keys[index]
        parent = self.nodes.get(keys[index - 1]) if index else None
        if key in self.nodes or (index and parent is None):
            return
        block = self.cache.blocks_of(slot)[index]
        self.cache.allocator.hold([block])
        state = [v.to("cpu", copy=True) for v in self.cache.slot_state(slot)]
        self._add(Node(key, parent, block, state))
        if self.store is not None:
            self.store.save(key, prompt[index * CACHE_BLOCK:(index + 1) * CACHE_BLOCK],
                            self.cache.block_rows(block), state)

    def evict(self, free_blocks: int, keep: list[Node] = ()) -> None:
        """Drop unshared leaves (not in `keep`), least recently used first, until the allocator has `free_blocks`
        free or no leaf is left to drop."""
        allocator = self.cache.allocator
        while allocator.free < free_blocks:
            leaves = [n for n in self.nodes.values()
                      if n.children == 0 and allocator.owners(n.block) == 1 and n not in keep]
            if not leaves:
                return
            node = min(leaves, key=lambda n: n.last_use)
            del self.nodes[node.key]
            if node.parent is not None:
                node.parent.children -= 1
            allocator.give_back([node.block])
            self.stats.evicted_blocks += 1

    def _add(self, node: Node) -> None:
        node.last_use = self._clock
        self.nodes[node.key] = node
        if node.parent is not None:
            node.parent.children += 1

    def _from_disk(self, key: str, tokens: list[int], parent: Node | None, keep: list[Node]) -> Node | None:
        if self.store is None or not self.store.enabled:
            return None
        self.evict(1, keep)
        if self.cache.allocator.free == 0:
            return None
        rows_like = self.cache.block_rows(0)
        state_like = self.cache.slot_state(self.cache.scratch_slot)
        loaded = self.store.load(key, tokens, rows_like, state_like)
        if loaded is None:
            return None
        rows, state = loaded
        [block] = self.cache.allocator.take(1)
        for view, saved in zip(self.cache.block_rows(block), rows):
            view.copy_(saved)
        node = Node(key, parent, block, state)
        self._add(node)
        return node
