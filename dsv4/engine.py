"""The generation engine: prefill, incremental decode over the heterogeneous KV cache, sampling, stopping.

Each request is prefilled on its own (optionally in chunks), then all live requests decode together, one token per
step, each at its own position. Sampling draws from a counter-based generator keyed by (seed, request id, position),
so a request's tokens do not depend on which other requests share its batch.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsv4 import validate
from dsv4.cache import KVCache
from dsv4.diagnose import NonFiniteLogits, non_finite_error
from dsv4.model import Step, Transformer


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


class Engine:
    def __init__(self, model: Transformer, device: torch.device, seed: int = 0, max_batch: int | None = None,
                 prefill_chunk: int | None = None):
        validate.engine_settings(seed, max_batch, prefill_chunk)
        self.model, self.device, self.seed = model, torch.device(device), seed
        self.config = model.config
        self.max_batch = max_batch or self.config.max_batch_size
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(self.config, self.max_batch, self.device)
        self.timings = Timings()

    def check(self, request: Request) -> None:
        validate.request(self.config, request)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: list[int], slots: list[int],
                all_logits: bool = False) -> torch.Tensor:
        """One model step: tokens [b, s] at per-sequence start positions in cache rows `slots`."""
        step = Step(start=torch.tensor(start, device=self.device), slots=torch.tensor(slots, device=self.device),
                    cache=self.cache, n_new=tokens.shape[1])
        logits, _ = self.model(tokens.to(self.device), step, all_logits=all_logits)
        return logits

    def prefill(self, prompt: list[int], slot: int, all_logits: bool = False,
                progress: ProgressCallback | None = None) -> torch.Tensor:
        """Reset `slot` and run the prompt through it, in chunks of `prefill_chunk` tokens if set."""
        self.cache.reset(slot)
        chunk = self.prefill_chunk or len(prompt)
        outputs = []
        for begin in range(0, len(prompt), chunk):
            piece = torch.tensor([prompt[begin:begin + chunk]])
            outputs.append(self.forward(piece, [begin], [slot], all_logits=all_logits))
            if progress:
                progress("prefill", min(begin + chunk, len(prompt)), len(prompt))
        return torch.cat(outputs, dim=1) if all_logits else outputs[-1]

    def sample(self, logits: torch.Tensor, requests: list[Request], positions: list[int]) -> list[int]:
        """One token per row. Rows whose logits hold NaN or Inf raise NonFiniteLogits: their finiteness is read in
        the same host transfer as the tokens (no extra synchronisation), and the sampler gets zeros in their place."""
        ops = self.model.ops
        dev = logits.device
        finite = torch.isfinite(logits).all(dim=-1)
        tokens = ops.sample(torch.where(finite[:, None], logits.float(), 0.0),
                            torch.tensor([r.temperature for r in requests], device=dev),
                            torch.tensor([r.top_p for r in requests], device=dev), self.seed,
                            torch.tensor([r.request_id for r in requests], device=dev),
                            torch.tensor(positions, device=dev))
        tokens, finite = torch.stack([tokens, finite.to(tokens.dtype)]).tolist()
        if not all(finite):
            raise NonFiniteLogits(finite.index(0))
        return tokens

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
        eos = self.config.eos_token_id
        live: dict[int, int] = {}            # request index -> cache slot
        last_logits: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        for slot, i in enumerate(indices):
            last_logits[i] = self.prefill(requests[i].prompt, slot, progress=progress)[0, -1]
            live[i] = slot
            self.timings.prefill_tokens += len(requests[i].prompt)
        self._sync()
        self.timings.prefill_seconds += time.perf_counter() - t0

        t0 = time.perf_counter()
        while live:
            order = list(live)
            logits = torch.stack([last_logits[i] for i in order])
            positions = [len(requests[i].prompt) + len(results[i].tokens) for i in order]
            try:
                sampled = self.sample(logits, [requests[i] for i in order], positions)
            except NonFiniteLogits as e:      # name the first layer that is not finite, on the sequence that showed it
                i = order[e.row]
                raise non_finite_error(self.model, self.device, requests[i].prompt + results[i].tokens,
                                       self.prefill_chunk) from None
            for i, token, row in zip(order, sampled, logits):
                results[i].tokens.append(token)
                if record_logits:
                    results[i].logits.append(row.cpu())
                if on_token:
                    on_token(i, token)
                if token == eos or len(results[i].tokens) >= requests[i].max_new_tokens:
                    results[i].finish_reason = "eos" if token == eos else "length"
                    del live[i]
            if progress:
                progress("decode", sum(len(results[i].tokens) for i in indices),
                         sum(requests[i].max_new_tokens for i in indices))
            if not live:
                break
            order = list(live)
            tokens = torch.tensor([[results[i].tokens[-1]] for i in order])
            start = [len(requests[i].prompt) + len(results[i].tokens) - 1 for i in order]
            out = self.forward(tokens, start, [live[i] for i in order])
            for i, row in zip(order, out[:, -1]):
                last_logits[i] = row
            self.timings.decode_tokens += len(order)
        self._sync()
        self.timings.decode_seconds += time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
