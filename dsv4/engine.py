"""The generation engine: prefill, incremental decode over the paged KV cache, sampling, stopping.

Each request is prefilled on its own (optionally in chunks), then all live requests decode together, one token per
step, each at its own position. Sampling draws from a counter-based generator keyed by (seed, request id, position),
so a request's tokens do not depend on which other requests share its batch.

On a GPU a decode step runs as a CUDA graph (dsv4.steps): the batch is padded to a bucket size (a power of two,
rows of the cache's scratch slot), and each bucket's whole step (every layer, the head and sampling) is captured once
and replayed. Eager execution (`graphs=False`) pads the same way, so replay and eager give the same bits at every
level. On the CPU, steps run eagerly at their own size.

With `speculate=N` the MTP block drafts up to N tokens per sequence and one main-model step verifies them, a round
that is captured and replayed like a decode step (dsv4.speculative); the tokens are those of plain decoding wherever
verification is bit-identical to it.
"""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsv4 import validate
from dsv4.cache import KVCache, Step
from dsv4.diagnose import NonFiniteLogits, non_finite_error
from dsv4.steps import Outputs, Rows, StepGraph, sampling_settings
from dsv4.model import Transformer
from dsv4.speculative import Emit, Speculator


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    request_id: int = 0          # keys the sampling draws: same id + seed -> same tokens anywhere


@dataclass
class Result:
    request: Request
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""                   # "eos" or "length"
    logits: list[torch.Tensor] = field(default_factory=list)   # per generated token, when recorded


@dataclass
class Timings:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def prompt_key(prompt: list[int]) -> int:
    """A request id derived from the prompt's tokens (63 bits of sha256): the same prompt samples the same tokens
    whatever else is in the batch and wherever it sits."""
    digest = hashlib.sha256(",".join(map(str, prompt)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


TokenCallback = Callable[[int, int], None]          # (index of the request, new token id)
ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)


def bucket_sizes(max_batch: int) -> list[int]:
    """Decode batch buckets: powers of two up to max_batch, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class Engine:
    def __init__(self, model: Transformer, device: torch.device, seed: int = 0, max_batch: int | None = None,
                 prefill_chunk: int | None = None, cache_blocks: int | None = None, graphs: bool | None = None,
                 speculate: int = 0):
        validate.engine_settings(seed, max_batch, prefill_chunk)
        validate.speculate(model.config, speculate, any(getattr(b.ffn, "group", None) for b in model.layers))
        self.model, self.device, self.seed = model, torch.device(device), seed
        self.config = model.config
        self.max_batch = max_batch or self.config.max_batch_size
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(self.config, self.max_batch, self.device, blocks=cache_blocks)
        self.timings = Timings()
        # Buckets (and graphs) where a step has a launch cost worth removing; expert parallelism runs eagerly.
        on_gpu = self.device.type == "cuda" and not any(getattr(b.ffn, "group", None) for b in model.layers)
        self.buckets = bucket_sizes(self.max_batch) if on_gpu else None
        self.graphs = on_gpu if graphs is None else graphs and on_gpu
        self._graphs: dict[tuple, StepGraph] = {}
        self._graph_pool = None
        self.speculator = Speculator(self, speculate) if speculate else None

    def check(self, request: Request) -> None:
        validate.request(self.config, request)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, start: list[int], slots: list[int],
             all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One eager model step: tokens [b, s] at per-sequence start positions in cache slots `slots`; (logits,
        final streams [b, s, hc, d])."""
        step = self.cache.step(start, slots, tokens.shape[1])
        return self.model(tokens.to(self.device), step, all_logits=all_logits)

    def forward(self, tokens: torch.Tensor, start: list[int], slots: list[int],
                all_logits: bool = False) -> torch.Tensor:
        """One eager model step's logits (see `step`)."""
        return self.step(tokens, start, slots, all_logits)[0]

    def prefill(self, prompt: list[int], slot: int, all_logits: bool = False,
                progress: ProgressCallback | None = None) -> torch.Tensor:
        """Reset `slot` and run the prompt through it, in chunks of `prefill_chunk` tokens if set."""
        return self.prefill_streams(prompt, slot, all_logits, progress)[0]

    def prefill_streams(self, prompt: list[int], slot: int, all_logits: bool = False,
                        progress: ProgressCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefill`, with the final streams of every prompt position [1, len, hc, d] (what the MTP block reads)."""
        self.cache.reset(slot)
        chunk = self.prefill_chunk or len(prompt)
        outputs, streams = [], []
        for begin in range(0, len(prompt), chunk):
            piece = torch.tensor([prompt[begin:begin + chunk]])
            logits, h = self.step(piece, [begin], [slot], all_logits=all_logits)
            outputs.append(logits)
            streams.append(h)
            if progress:
                progress("prefill", min(begin + chunk, len(prompt)), len(prompt))
        return torch.cat(outputs, dim=1) if all_logits else outputs[-1], torch.cat(streams, dim=1)

    def sample(self, logits: torch.Tensor, requests: list[Request], positions: list[int]) -> list[int]:
        """One token per row. Rows whose logits hold NaN or Inf raise NonFiniteLogits: their finiteness is read in
        the same host transfer as the tokens (no extra synchronisation), and the sampler gets zeros in their place."""
        settings = (t.to(logits.device) for t in sampling_settings(requests))
        return _checked(self.draw(logits, *settings, torch.tensor(positions, device=logits.device)))

    def draw(self, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, request: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        """[2, rows]: the token sampled from each row of logits with its settings and request id at its position
        (zeros in place of non-finite logits), and whether the row was finite; on the device, nothing read yet."""
        finite = torch.isfinite(logits).all(dim=-1)
        tokens = self.model.ops.sample(torch.where(finite[:, None], logits.float(), 0.0), temperature, top_p,
                                       self.seed, request, positions)
        return torch.stack([tokens, finite.to(tokens.dtype)])

    def rows(self, tokens: list[list[int]], start: list[int], slots: list[int], requests: list[Request],
             left: list[int] | None = None) -> Rows:
        """A step's rows, padded to the smallest bucket that holds them (on a GPU; unpadded on the CPU)."""
        size = len(slots) if self.buckets is None else next(b for b in self.buckets if b >= len(slots))
        return Rows.of(tokens, start, slots, requests, size, self.cache.scratch_slot, left)

    def run(self, key: tuple, step: Callable[[Rows], Outputs], rows: Rows) -> Outputs:
        """step(rows) on the device: replayed from the CUDA graph captured for (key, the rows' batch size) when graphs
        are on, else eagerly. A step reads only device tensors (no host synchronisation), so it can be captured."""
        if not self.graphs:
            return step(rows.to(self.device))
        key = (*key, rows.slots.shape[0])
        graph = self._graphs.get(key)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = self._graphs[key] = StepGraph(step, rows.idle(self.cache.scratch_slot), self._graph_pool,
                                                  self.device)
        return graph(rows)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], start: list[int],
               requests: list[Request]) -> tuple[list[int], torch.Tensor]:
        """One decode step: token tokens[i] at position start[i] of the sequence in slots[i]; returns the next
        token of each (sampled with its request's settings at position start[i] + 1) and the logits [b, vocab]."""
        for slot, first in zip(slots, start):
            self.cache.reserve(slot, first + 1)
        width = self.cache.table_width(max(start) + 1)
        rows = self.rows([[t] for t in tokens], start, slots, requests)
        sampled, logits = self.run(("decode", width), functools.partial(self._decode_step, width=width), rows)
        return _checked(sampled[:, :len(slots)]), logits[:len(slots)]

    def _decode_step(self, rows: Rows, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([2, b]: the sampled tokens and whether each row's logits are finite, logits [b, vocab]) of one token per
        row, reading `width` block-table columns."""
        step = Step(start=rows.start, slots=rows.slots, cache=self.cache, n_new=1,
                    block_table=self.cache.block_table[rows.slots, :width])
        logits = self.model(rows.tokens, step)[0][:, -1]
        return self.draw(logits, *rows.sampling(), rows.start + 1), logits

    def generate(self, requests: list[Request], on_token: TokenCallback | None = None,
                 record_logits: bool = False, progress: ProgressCallback | None = None) -> list[Result]:
        """Generate for every request; batches of up to max_batch decode together."""
        for r in requests:
            self.check(r)
        results = [Result(r) for r in requests]
        for first in range(0, len(requests), self.max_batch):
            self._generate_batch(list(range(first, min(first + self.max_batch, len(requests)))), requests, results,
                                 on_token, record_logits, progress)
        return results

    def _generate_batch(self, indices: list[int], requests: list[Request], results: list[Result],
                        on_token: TokenCallback | None, record_logits: bool,
                        progress: ProgressCallback | None) -> None:
        live: dict[int, int] = {}            # request index -> cache slot
        heads: dict[int, tuple] = {}         # speculating: request index -> the MTP block's output after its prompt
        t0 = time.perf_counter()
        first_tokens, first_logits = [], []
        for slot, i in enumerate(indices):
            logits, streams = self.prefill_streams(requests[i].prompt, slot, progress=progress)
            logits = logits[:, -1]
            try:
                first_tokens += self.sample(logits, [requests[i]], [len(requests[i].prompt)])
            except NonFiniteLogits:
                raise non_finite_error(self.model, self.device, requests[i].prompt, self.prefill_chunk) from None
            first_logits.append(logits[0])
            if self.speculator:            # prompt work, so it counts as prefill
                heads[i] = self.speculator.read_prompt(streams, requests[i].prompt[1:] + first_tokens[-1:], 0, slot)
            live[i] = slot
            self.timings.prefill_tokens += len(requests[i].prompt)
        self._sync()
        self.timings.prefill_seconds += time.perf_counter() - t0

        t0 = time.perf_counter()
        emit = functools.partial(self._emit, requests, results, live, on_token, record_logits)
        if self.speculator:
            self.speculator.decode(live, first_tokens, first_logits, heads, requests, results, emit, progress)
        else:
            self._decode_plain(indices, live, first_tokens, first_logits, requests, results, emit, progress)
        self._sync()
        self.timings.decode_seconds += time.perf_counter() - t0

    def _decode_plain(self, indices: list[int], live: dict[int, int], first_tokens: list[int],
                      first_logits: list[torch.Tensor], requests: list[Request], results: list[Result],
                      emit: Emit, progress: ProgressCallback | None) -> None:
        """One token per live request and step until every request is done."""
        order = list(live)
        sampled, logits = first_tokens, torch.stack(first_logits)
        while True:
            for i, token, row in zip(order, sampled, logits):
                emit(i, token, row)
            if progress:
                progress("decode", sum(len(results[i].tokens) for i in indices),
                         sum(requests[i].max_new_tokens for i in indices))
            if not live:
                break
            order = list(live)
            start = [len(requests[i].prompt) + len(results[i].tokens) - 1 for i in order]
            try:
                sampled, logits = self.decode([live[i] for i in order], [results[i].tokens[-1] for i in order],
                                              start, [requests[i] for i in order])
            except NonFiniteLogits as e:      # name the first layer that is not finite, on the sequence that showed it
                i = order[e.row]
                raise non_finite_error(self.model, self.device, requests[i].prompt + results[i].tokens,
                                       self.prefill_chunk) from None
            self.timings.decode_tokens += len(order)

    def _emit(self, requests: list[Request], results: list[Result], live: dict[int, int],
              on_token: TokenCallback | None, record_logits: bool, i: int, token: int, row: torch.Tensor) -> bool:
        """Append request i's next token (and its logits row); True, and i leaves `live`, when it was the last."""
        results[i].tokens.append(token)
        if record_logits:
            results[i].logits.append(row.cpu())
        if on_token:
            on_token(i, token)
        eos = self.config.eos_token_id
        if token == eos or len(results[i].tokens) >= requests[i].max_new_tokens:
            results[i].finish_reason = "eos" if token == eos else "length"
            del live[i]
            return True
        return False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _checked(sampled: torch.Tensor) -> list[int]:
    """[2, b] (tokens, finiteness flags) -> the tokens, in one host read; NonFiniteLogits names a row that is not."""
    tokens, finite = sampled.tolist()
    if not all(finite):
        raise NonFiniteLogits(finite.index(0))
    return tokens
