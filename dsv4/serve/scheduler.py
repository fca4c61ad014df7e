"""Continuous batching: requests join and leave the running batch at every step, on one engine thread.

Each step prefills block-aligned chunks (CACHE_BLOCK tokens, or up to the prompt's end) of the oldest requests
still prefilling, up to CACHE_BLOCK tokens in all (at least one chunk), then decodes one token for every request
past its prompt. So long prompts are interleaved with
decoding, and every prompt is cut at the same positions whatever else runs, which with the prefix cache
(dsv4.serve.prefix) makes a cached prefix indistinguishable from a computed one. At `batch-invariant` and `exact`
the engine's bits do not depend on the batch, and sampling is keyed by (seed, request id, position): a request's
tokens and logprobs are the same under any load.

With `speculate=N` (dsv4.speculative) a request past its prompt takes a speculative round instead of a one-token
step: the MTP block's drafts are verified in one step, and 1 .. N+1 tokens are emitted. The tokens and logprobs are
those of plain decoding at `batch-invariant` and `exact`. The MTP block reads each prefill chunk, so cached prefixes
hold its rows too; only the drafts (the speed, never the tokens) can depend on which request cached a prefix,
since the block's row at a chunk's last position reads the next chunk's first token.

Admission is bounded by the KV block budget: a request is admitted into a free slot once the blocks for its whole
length (prompt + max_new_tokens) are free, evicting unshared prefix-cache blocks if needed, so a running request
never runs out of cache; the others wait in a bounded queue. A request that could never fit, or one over the
queue bound, is refused at once.

    scheduler = Scheduler(pipe).start()
    streams = [scheduler.stream(Request(ids, max_new_tokens=16, request_id=i)) for i, ids in enumerate(prompts)]
    for event in streams[0]:
        print(event.token)
"""
from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dsv4 import validate
from dsv4.api import Pipeline
from dsv4.backends.canonical.primitives import exp, lane_sum, log, topk_lower_index
from dsv4.cache import KVCache, blocks_for
from dsv4.config import CACHE_BLOCK, ModelConfig
from dsv4.diagnose import NonFiniteLogits
from dsv4.engine import Engine, Request
from dsv4.errors import DSV4Error
from dsv4.serve.prefix import PrefixCache, chain_keys
from dsv4.serve.store import PrefixStore

MAX_TOP_LOGPROBS = 20    # alternatives a token's logprobs may list (OpenAI's limit)


class QueueFull(DSV4Error):
    """The bounded queue of waiting requests is full: try again later."""


@dataclass
class Token:
    token: int
    logprob: float | None                         # the model's log-probability of it (None: not asked for)
    top: list[tuple[int, float]] = field(default_factory=list)   # the likeliest tokens and theirs


@dataclass
class Finished:
    reason: str                    # "stop" (end-of-sequence token), "length", or "cancelled"
    prompt_tokens: int
    cached_tokens: int             # prompt tokens that came from the prefix cache
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Token | Finished | Failed


@dataclass(eq=False)
class Job:
    """A request inside the scheduler."""
    request: Request
    emit: Callable[[Event], None]       # called on the engine thread
    top_logprobs: int | None            # None: no logprobs
    keys: list[str]                     # chain keys of the prompt's complete blocks
    slot: int = -1
    position: int = 0                   # prompt tokens in the cache so far
    cached: int = 0                     # prompt tokens taken from the prefix cache
    from_disk: int = 0                  # of those, read from disk
    tokens: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)   # speculating: the last token, then its drafts
    cancelled: bool = False


def positions_written(request: Request) -> int:
    """Cache positions a request may write: its prompt and every new token but the last (never fed back)."""
    return len(request.prompt) + request.max_new_tokens - 1


class Ticket:
    """A submitted request: `cancel()` frees its slot and blocks at the next step."""

    def __init__(self, job: Job, scheduler: "Scheduler"):
        self._job, self._scheduler = job, scheduler

    def cancel(self) -> None:
        self._job.cancelled = True
        self._scheduler.wake()


class TokenStream:
    """The Python API's view of a request: iterate over its Token events; `finished` holds the Finished event."""

    def __init__(self) -> None:
        self._events: queue.Queue[Event] = queue.Queue()
        self.finished: Finished | None = None
        self.ticket: Ticket | None = None

    def __iter__(self) -> Iterator[Token]:
        while True:
            event = self._events.get()
            if isinstance(event, Failed):
                raise DSV4Error(event.message)
            if isinstance(event, Finished):
                self.finished = event
                return
            yield event


class Scheduler:
    def __init__(self, pipe: Pipeline, max_batch: int | None = None, cache_blocks: int | None = None,
                 max_queue: int = 256, prefix: bool = True, store: PrefixStore | None = None, speculate: int = 0):
        self.engine = Engine(pipe.model, pipe.device, max_batch=max_batch, cache_blocks=cache_blocks,
                             speculate=speculate)
        self.speculator = self.engine.speculator
        self.config, self.cache = self.engine.config, self.engine.cache
        self.max_queue = validate.integer(max_queue, "max_queue", minimum=1)
        self.prefix = PrefixCache(self.cache, store) if prefix else None
        self._free_slots = list(range(self.engine.max_batch - 1, -1, -1))
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._lock = threading.Condition()
        self._closed = False
        self.finished: Counter[str] = Counter()      # requests ended, by reason ("stop", "length", "cancelled")
        self._thread = threading.Thread(target=self._loop, name="dsv4-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def check(self, request: Request) -> None:
        """Refuse at once what could never run: bad settings, over the context, more blocks than the cache has."""
        validate.request(self.config, request)
        need, have = blocks_for(positions_written(request)), self.cache.allocator.n_blocks - 1
        if need > have:
            raise DSV4Error(f"prompt of {len(request.prompt)} tokens plus {request.max_new_tokens} new tokens needs "
                            f"{need} KV cache blocks of {CACHE_BLOCK} positions, the cache has {have}; give the "
                            f"server more --kv-cache-memory or ask for fewer tokens")

    def submit(self, request: Request, emit: Callable[[Event], None], top_logprobs: int | None = None) -> Ticket:
        """Queue a request; `emit` gets its events on the engine thread. Raises DSV4Error (QueueFull when the
        queue is full) before queueing anything."""
        self.check(request)
        if top_logprobs is not None:
            validate.integer(top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS + 1)
        job = Job(request, emit, top_logprobs, chain_keys(request.prompt) if self.prefix else [])
        with self._lock:
            if self._closed:
                raise DSV4Error("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"too many requests: {len(self._waiting)} are already waiting (the limit); "
                                f"try again later")
            self._waiting.append(job)
            self._lock.notify()
        return Ticket(job, self)

    def stream(self, request: Request, top_logprobs: int | None = None) -> TokenStream:
        """Submit a request and get an iterator over its tokens (the Python API)."""
        stream = TokenStream()
        stream.ticket = self.submit(request, stream._events.put, top_logprobs)
        return stream

    def status(self) -> dict:
        with self._lock:
            waiting, running = len(self._waiting), len(self._running)
        return {"running": running, "waiting": waiting, "free_blocks": self.cache.allocator.free,
                "total_blocks": self.cache.allocator.n_blocks - 1,
                "cached_blocks": len(self.prefix.nodes) if self.prefix else 0,
                "prefix_cache": self.prefix.stats.as_dict() if self.prefix else None,
                "disk_cache": self.prefix is not None and self.prefix.store is not None
                and self.prefix.store.enabled, "finished": dict(self.finished),
                "speculation": None if self.speculator is None else {
                    "drafts": self.speculator.drafts, "acceptance_rate": self.speculator.stats.acceptance_rate,
                    "tokens_per_step": self.speculator.stats.tokens_per_step}}

    # -- the engine thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closed or self._running or self._waiting)
                if self._closed:
                    break
                cancelled = [j for j in self._waiting if j.cancelled]
                for job in cancelled:
                    self._waiting.remove(job)
            for job in cancelled:
                self.finished["cancelled"] += 1
                job.emit(Finished("cancelled", len(job.request.prompt), 0, 0))
            for job in [j for j in self._running if j.cancelled]:
                self._finish(job, "cancelled")
            self._admit()
            try:
                self._step()
            except NonFiniteLogits:
                self._fail_all("the model's logits are not finite (NaN or infinity); run `dsv4 run` on the "
                               "prompt to find the layer")
            except Exception as e:    # a fault in one step must not stop the server: fail what was running
                self._fail_all(f"internal error: {type(e).__name__}: {e}")
        for job in self._running + list(self._waiting):
            job.emit(Failed("the server is shutting down"))

    def _admit(self) -> None:
        while self._free_slots:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting[0]
            slot = self._free_slots[-1]
            self.cache.reset(slot)
            job.slot = slot
            if self.prefix:
                try:
                    self._reuse(job)
                except Exception as e:   # a fault while restoring a prefix fails this request only
                    self.cache.reset(slot)
                    with self._lock:
                        self._waiting.popleft()
                    job.emit(Failed(f"internal error while restoring a cached prefix: {type(e).__name__}: {e}"))
                    continue
            own = blocks_for(positions_written(job.request)) - len(self.cache.blocks_of(slot))
            if self.prefix and self.cache.allocator.free < own:
                self.prefix.evict(own)
            if self.cache.allocator.free < own:       # wait for running requests to give blocks back
                self.cache.reset(slot)
                job.slot, job.position, job.cached, job.from_disk = -1, 0, 0, 0
                return
            self.cache.reserve(slot, positions_written(job.request))
            self._free_slots.pop()
            with self._lock:
                self._waiting.popleft()
                self._running.append(job)

    def _reuse(self, job: Job) -> None:
        """Continue the job from the longest cached prefix of its prompt, if that reaches past its position: at
        admission, and again before each prefill chunk, so a request admitted with others sharing its prefix
        takes the blocks the first of them computes instead of computing them too."""
        found = self.prefix.match(job.request.prompt, job.keys)
        first = job.position // CACHE_BLOCK
        if len(found.nodes) <= first:
            return
        self.prefix.restore(job.slot, found.nodes, first)
        job.cached += (len(found.nodes) - first) * CACHE_BLOCK
        job.from_disk += found.from_disk * CACHE_BLOCK
        job.position = found.tokens

    @torch.inference_mode()
    def _step(self) -> None:
        decoding = [j for j in self._running if j.tokens]
        budget = CACHE_BLOCK             # prefill tokens per step: short prompts go together, long ones by block
        for job in [j for j in self._running if not j.tokens]:
            if budget <= 0:
                break
            budget -= self._prefill_chunk(job)
        if decoding:
            self._decode(decoding)

    def _prefill_chunk(self, job: Job) -> int:
        """Prefill the job's next chunk (each its own forward step: the cut points never depend on the others);
        the number of tokens it computed. Speculating, the MTP block reads each chunk after the main model (for the
        prompt's last position, once its first token is drawn), so that a cached prefix holds its rows too."""
        prompt, spec = job.request.prompt, self.speculator
        if self.prefix:
            self._reuse(job)
        begin = job.position
        end = min(begin + CACHE_BLOCK, len(prompt))
        logits, streams = self.engine.step(torch.tensor([prompt[begin:end]]), [begin], [job.slot])
        logits = logits[:, -1]
        job.position = end
        first = self.engine.sample(logits, [job.request], [end]) if end == len(prompt) else []
        if spec:
            head = spec.read_prompt(streams, prompt[begin + 1:end] + (first or prompt[end:end + 1]), begin, job.slot)
        if self.prefix and end % CACHE_BLOCK == 0:
            self.prefix.insert(job.slot, prompt, job.keys, end // CACHE_BLOCK - 1)
        if first:
            if self.prefix:
                self.prefix.record(len(prompt), job.cached - job.from_disk, job.from_disk)
            self._emit([job], first, logits)
            if spec and job in self._running:
                left = job.request.max_new_tokens - len(job.tokens)
                job.pending = first + spec.first_drafts([head], [job.slot], [end], [left], [job.request])[0]
        return end - begin

    def _decode(self, jobs: list[Job]) -> None:
        start = [len(j.request.prompt) + len(j.tokens) - 1 for j in jobs]
        if self.speculator is None:
            tokens, logits = self.engine.decode([j.slot for j in jobs], [j.tokens[-1] for j in jobs], start,
                                                [j.request for j in jobs])
            self._emit(jobs, tokens, logits)
            return
        left = [j.request.max_new_tokens - len(j.tokens) for j in jobs]
        verified = self.speculator.round([j.slot for j in jobs], [j.pending for j in jobs], start, left,
                                         [j.request for j in jobs])
        for job, v in zip(jobs, verified):       # the tokens of a round end where the request ends
            for token, row in zip(v.tokens, v.logits):
                self._emit([job], [token], row[None])
            job.pending = v.pending

    def _emit(self, jobs: list[Job], tokens: list[int], logits: torch.Tensor) -> None:
        want = [i for i, j in enumerate(jobs) if j.top_logprobs is not None]
        rows = logprobs(logits[want]).cpu() if want else None
        eos = self.config.eos_token_id
        for i, (job, token) in enumerate(zip(jobs, tokens)):
            job.tokens.append(token)
            if token == eos:
                self._finish(job, "stop")
                continue
            event = Token(token, None)
            if job.top_logprobs is not None:
                row = rows[want.index(i)]
                event.logprob = row[token].item()
                if job.top_logprobs:
                    values, ids = topk_lower_index(row, job.top_logprobs)
                    event.top = list(zip(ids.tolist(), values.tolist()))
            job.emit(event)
            if len(job.tokens) >= job.request.max_new_tokens:
                self._finish(job, "length")

    def _release(self, job: Job) -> None:
        """Give the job's slot and blocks back (blocks the prefix cache holds stay cached)."""
        self.cache.reset(job.slot)
        self._free_slots.append(job.slot)
        with self._lock:
            self._running.remove(job)

    def _finish(self, job: Job, reason: str) -> None:
        self.finished[reason] += 1        # counted before the job leaves `running`, so /health never lags
        self._release(job)
        job.emit(Finished(reason, len(job.request.prompt), job.cached, len(job.tokens)))

    def _fail_all(self, message: str) -> None:
        for job in list(self._running):
            self._release(job)
            job.emit(Failed(message))


def cache_blocks_for_memory(config: ModelConfig, memory: int) -> int:
    """How many KV cache blocks (with the null block) `memory` bytes of paged pool hold for this model."""
    per_block = sum(v.nbytes for v in KVCache(config, 1, "meta", blocks=2).block_rows(1))
    blocks = memory // per_block + 1
    if blocks < 2:
        raise DSV4Error(f"a KV cache memory of {memory} bytes holds no block of this model ({per_block} bytes "
                        f"per block of {CACHE_BLOCK} positions)")
    return blocks


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of logits [b, vocab] in the exact contract's order (dsv4.backends.canonical): the same bits on
    every device, row by row, whatever the batch."""
    z = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    return z - log(lane_sum(exp(z)))[:, None]
