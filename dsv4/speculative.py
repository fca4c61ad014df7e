"""Speculative decoding with the MTP block: it drafts up to N tokens per sequence, one main-model step verifies them
all, and the cache is rolled back exactly past the first rejection. It changes nothing but the speed.

A round, for a sequence whose last emitted token x_p sits at position p (the main model and the MTP block have read
positions 0 .. p-1; the MTP block reads main streams h_q and token x_q+1 at its position q), with drafts d_p+1 ..
d_p+k:
1. Verify: the main model reads x_p, d_p+1 .. d_p+k at positions p .. p+k in one step and draws a token t at each
   with the key plain decoding draws it with, (seed, request, position). A draft is accepted iff it equals the main
   model's own token there (and so do the drafts before it); the a accepted drafts and the token after them are
   emitted (1 .. k+1 tokens), and the main cache is rolled back past the kept positions p .. p+a (`Rollback`).
2. Catch up: the MTP block reads (h_q, t_q+1) at q = p .. p+k and is rolled back past the same positions; its logits
   at p+a draft d_p'+1, p' = p+a+1 being the position of the last emitted token.
3. Chain: further drafts run the block on its own output streams: (h', d_p'+j) at MTP position p'+j-1 drafts
   d_p'+j+1. Those MTP rows are rolled back afterwards; step 2 of the next round writes the positions again from the
   main model's streams.
A round is device work only: on a GPU it is one CUDA graph per (bucket, block-table width, k, all greedy)
(dsv4.steps), and the host reads one small report per round (tokens, accepted counts, the next drafts). During
prefill the MTP block reads the prompt's positions; the first drafts are chained from there.

Rollback (`Rollback`): the window-ring rows of the rejected positions get back what they held, and every compressor's
open-block state gets back its rows and is fed the kept positions' rows the way one-token decode steps feed them, so
the cache is the one plain decoding leaves. Compressed entries written for rejected positions belong to blocks that
are not complete: no query reads them, and they are written again once complete.

Drafts are drawn with the main model's sampling key, so a good draft of a sampled token is accepted as often as a
greedy one. Wherever a verification step gives the bits of one-token decode steps (`batch-invariant` and `exact`,
docs/determinism.md) the tokens and logits are those of plain decoding; at `fast` and `deterministic` they may
differ within the kernels' tolerance (docs/speculative.md).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsv4.cache import CompressorState, KVCache, PagedRows, Step
from dsv4.config import CSA_RATIO
from dsv4.diagnose import NonFiniteLogits, non_finite_error
from dsv4.steps import Rows

if TYPE_CHECKING:
    from dsv4.engine import Engine, ProgressCallback, Request, Result

Emit = Callable[[int, int, torch.Tensor], bool]   # (request index, token, its logits row) -> that was the last one


@dataclass
class SpeculationStats:
    """Counts over verification steps, each sequence's share of a batched step counted as one step."""
    steps: int = 0
    drafted: int = 0          # draft tokens verified
    accepted: int = 0         # of those, equal to the main model's token
    emitted: int = 0          # tokens emitted by verification steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0


@dataclass
class Verified:
    """A sequence's share of a round: the tokens to emit (accepted drafts and the main model's token after them, up
    to its end) with their logits rows [n, vocab], and its tokens for the next round (last token, then drafts)."""
    tokens: list[int]
    logits: torch.Tensor
    pending: list[int]


class Rollback:
    """The cache state that a step over positions start[i] .. start[i]+n-1 of `slots` changes in `layers`, saved
    before the step (n at most the window), so that `keep` undoes it past each sequence's first kept[i] positions.
    Device work only, with no host read: it runs inside captured rounds."""

    def __init__(self, cache: KVCache, layers: list[int], slots: torch.Tensor, start: torch.Tensor, n: int):
        window = cache.config.window_size
        self.slots, self.start = slots, start
        self.offsets = torch.arange(n, device=cache.device)
        self.rows = slots[:, None] * window + (start[:, None] + self.offsets) % window      # [b, n] ring rows
        self.scratch_row = cache.scratch_slot * window            # takes the writes of the rows that are kept
        self.parts = [(part, part[self.rows]) for i in layers
                      for part in _ring_parts(cache.layers[i].kv)]                       # (storage, saved [b, n, ..])
        self.states: list[tuple[CompressorState, int]] = []
        for i in layers:
            layer, ratio = cache.layers[i], cache.config.layer_ratio(i)
            self.states += [(state, r) for state, r in ((layer.compressor, ratio), (layer.indexer, CSA_RATIO))
                            if state is not None]
        self.saved_states = [(state.kv[slots], state.score[slots]) for state, _ in self.states]
        for state, _ in self.states:
            state.journal = []

    def keep(self, kept: torch.Tensor) -> None:
        """Undo the step past the first kept[i] positions of each sequence (kept: [b] int64, 0 .. n)."""
        undo = self.offsets >= kept[:, None]                                                # [b, n]
        target = torch.where(undo, self.rows, self.scratch_row)
        for part, saved in self.parts:
            part[target] = saved
        masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for (state, ratio), (kv, score) in zip(self.states, self.saved_states):
            fed_kv, fed_score = (torch.cat(rows, dim=1) if len(rows) > 1 else rows[0] for rows in zip(*state.journal))
            state.journal = None
            kv, score = (self._replay(ratio, saved, fed, kept, masks) for saved, fed in ((kv, fed_kv),
                                                                                       (score, fed_score)))
            state.kv[self.slots], state.score[self.slots] = kv, score

    def _replay(self, ratio: int, saved: torch.Tensor, fed: torch.Tensor, kept: torch.Tensor,
                masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """State rows [b, rows, width] from the saved ones fed the rows fed[:, j] for j < kept[i] (position
        start[i] + j) as a one-token decode step feeds them (model.Compressor._decode_blocks): row position % ratio
        of the current block; with overlap (ratio 4), a block completed becomes the previous block. `masks` caches
        each (ratio, j)'s masks for the states of one step."""
        overlap = ratio == CSA_RATIO
        previous, current = saved[:, :ratio * overlap], saved[:, ratio * overlap:]
        for j in range(fed.shape[1]):
            if (ratio, j) not in masks:
                live, held = j < kept, (self.start + j) % ratio
                write = live[:, None] & (torch.arange(ratio, device=kept.device) == held[:, None])
                masks[ratio, j] = write[..., None], (live & (held == ratio - 1))[:, None, None]
            write, done = masks[ratio, j]
            current = torch.where(write, fed[:, j, None], current)
            if overlap:
                previous = torch.where(done, current, previous)
        return torch.cat([previous, current], dim=1) if overlap else current


class Speculator:
    """An Engine's decode loop with MTP drafts of up to `drafts` tokens per sequence and round."""

    def __init__(self, engine: Engine, drafts: int):
        self.engine, self.drafts = engine, drafts
        self.stats = SpeculationStats()
        self.main_layers = list(range(engine.config.n_layers))
        self.mtp_layers = [engine.config.n_layers]

    @torch.inference_mode()
    def decode(self, live: dict[int, int], first_tokens: list[int], first_logits: list[torch.Tensor],
               heads: dict[int, tuple[torch.Tensor, torch.Tensor]], requests: list[Request], results: list[Result],
               emit: Emit, progress: ProgressCallback | None) -> None:
        """Decode the prefilled requests in `live` (request index -> cache slot; `heads`: what read_prompt returned
        for each prompt) to their end, every token through `emit`, which removes a finished request from `live`."""
        e = self.engine
        indices = list(live)
        for i, token, row in zip(indices, first_tokens, first_logits):
            emit(i, token, row)
        order = list(live)
        if not order:
            return
        drafts = self.first_drafts([heads[i] for i in order], [live[i] for i in order],
                                   *self._positions(order, requests, results))
        pending = {i: [results[i].tokens[-1], *d] for i, d in zip(order, drafts)}
        while live:
            order = list(live)
            try:
                verified = self.round([live[i] for i in order], [pending[i] for i in order],
                                      *self._positions(order, requests, results))
            except NonFiniteLogits as err:
                i = order[err.row]
                raise non_finite_error(e.model, e.device, requests[i].prompt + results[i].tokens,
                                       e.prefill_chunk) from None
            for i, v in zip(order, verified):
                for token, row in zip(v.tokens, v.logits):
                    e.timings.decode_tokens += 1
                    emit(i, token, row)
                pending[i] = v.pending
            if progress:
                progress("decode", sum(len(results[i].tokens) for i in indices),
                         sum(requests[i].max_new_tokens for i in indices))

    @staticmethod
    def _positions(order: list[int], requests: list[Request],
                  results: list[Result]) -> tuple[list[int], list[int], list[Request]]:
        """(positions of the last tokens, tokens each may still emit, the requests) of the sequences in `order`."""
        return ([len(requests[i].prompt) + len(results[i].tokens) - 1 for i in order],
                [requests[i].max_new_tokens - len(results[i].tokens) for i in order], [requests[i] for i in order])

    def draft_count(self, last: list[int], left: list[int]) -> int:
        """k for a round over sequences whose last tokens sit at `last`, each with `left` tokens still to emit: N,
        fewer when no sequence has more tokens to come, and near the end of the context, which the chained drafts
        (up to p+2k-1) must not pass."""
        return max(0, min(self.drafts, max(left) - 1, (self.engine.config.max_seq_len - max(last)) // 2))

    def read_prompt(self, streams: torch.Tensor, next_ids: list[int], begin: int,
                    slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block reads positions begin .. begin+n-1 of the sequence in `slot`: the main model's streams
        there [1, n, hc, d] and the tokens after them (next_ids, n of them), in chunks of the engine's
        prefill_chunk. (Its logits at the last position [vocab], its streams there [hc, d].)"""
        e = self.engine
        n = streams.shape[1]
        ids = torch.tensor([next_ids[:n]], device=e.device)
        chunk = e.prefill_chunk or n
        for first in range(0, n, chunk):
            step = e.cache.step([begin + first], [slot], min(chunk, n - first))
            logits, out = e.model.mtp_forward(streams[:, first:first + chunk], ids[:, first:first + chunk], step)
        return logits[0, -1], out[0, -1]

    def first_drafts(self, heads: list[tuple[torch.Tensor, torch.Tensor]], slots: list[int], last: list[int],
                     left: list[int], requests: list[Request]) -> list[list[int]]:
        """Each sequence's first drafts (k of `draft_count`) after the MTP block has read its prompt (`heads`: what
        read_prompt returned): the first from its logits, then chained through the block."""
        e = self.engine
        k = self.draft_count(last, left)
        if not k:
            return [[] for _ in slots]
        for slot, p, n in zip(slots, last, left):
            e.cache.reserve(slot, min(p + k, p + n))
        rows = Rows.of([[0]] * len(slots), last, slots, requests, len(slots), e.cache.scratch_slot).to(e.device)
        table = e.cache.block_table[rows.slots, :e.cache.table_width(max(last) + k)]
        logits, h = (torch.stack(t) for t in zip(*heads))
        greedy = _all_greedy(requests)
        first = self.draft_tokens(logits, rows, rows.start + 1, greedy)
        return self._chain(h[:, None], first, rows.start, rows, k, table, greedy).tolist()

    def round(self, slots: list[int], pending: list[list[int]], last: list[int], left: list[int],
              requests: list[Request]) -> list[Verified]:
        """Verify, roll back and draft once for the sequences in `slots` (one captured step on a GPU): `pending`
        holds each one's last token (at position `last`) and its drafts. Raises NonFiniteLogits for a sequence
        whose logits at a token to emit are not finite."""
        e = self.engine
        k = self.draft_count(last, left)
        for slot, p, n in zip(slots, last, left):          # positions past a sequence's end write the null block
            e.cache.reserve(slot, min(p + max(2 * k, 1), p + n))
        width = e.cache.table_width(max(last) + max(2 * k, 1))
        tokens = [(t + [0] * k)[:k + 1] for t in pending]   # a sequence that joined with fewer drafts: any draft
        rows = e.rows(tokens, last, slots, requests, left)  # is safe, a wrong one is rejected
        greedy = _all_greedy(requests)
        report, logits = e.run(("speculate", width, k, greedy),
                               functools.partial(self.verify, width=width, greedy=greedy), rows)
        n = k + 1
        verified = []
        for b, line in enumerate(report.tolist()[:len(slots)]):
            drawn, finite, accepted, kept = line[:n], line[n:2 * n], line[2 * n], line[2 * n + 1]
            if not all(finite[:kept]):
                raise NonFiniteLogits(b)
            verified.append(Verified(drawn[:kept], logits[b, :kept], line[2 * n + 2:]))
            self.stats.accepted += accepted
            self.stats.emitted += kept
        self.stats.steps += len(slots)
        self.stats.drafted += k * len(slots)
        return verified

    def verify(self, rows: Rows, width: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One round over `rows` (tokens [b, k+1]: each sequence's last token and its drafts), reading `width`
        block-table columns: (report [b, 3k+4] int64: the main model's tokens [k+1], their logits' finiteness [k+1],
        the drafts accepted, the tokens to emit (the accepted drafts and the one after them, cut at the sequence's
        end), then the token after the accepted drafts and the next round's k drafts; logits [b, k+1, vocab])."""
        e = self.engine
        b, n = rows.tokens.shape
        k = n - 1
        table = e.cache.block_table[rows.slots, :width]
        step = Step(start=rows.start, slots=rows.slots, cache=e.cache, n_new=n, block_table=table)
        undo = Rollback(e.cache, self.main_layers, rows.slots, rows.start, n)
        logits, h = e.model(rows.tokens, step, all_logits=True)                # [b, n, vocab], [b, n, hc, d]
        drawn, finite = e.draw(logits.flatten(0, 1), *rows.sampling(n), (step.positions + 1).flatten()).view(2, b, n)
        accepted = (drawn[:, :k] == rows.tokens[:, 1:]).long().cumprod(dim=1).sum(dim=1)
        kept = self._kept(drawn, accepted, rows.left)
        undo.keep(kept)
        seq = torch.arange(b, device=drawn.device)
        following = drawn[seq, accepted][:, None]                            # x_p': the token after the accepted
        if k:
            undo = Rollback(e.cache, self.mtp_layers, rows.slots, rows.start, n)
            mtp_logits, out = e.model.mtp_forward(h, drawn, step, all_logits=True)
            undo.keep(kept)
            after = rows.start + accepted + 1                                # p'
            first = self.draft_tokens(mtp_logits[seq, accepted], rows, after + 1, greedy)
            drafts = self._chain(out[seq, accepted][:, None], first, after, rows, k, table, greedy)
            following = torch.cat([following, drafts], dim=1)
        return torch.cat([drawn, finite, accepted[:, None], kept[:, None], following], dim=1), logits

    def _chain(self, h: torch.Tensor, first: torch.Tensor, after: torch.Tensor, rows: Rows, k: int,
               table: torch.Tensor, greedy: bool) -> torch.Tensor:
        """k drafts [b, k] for sequences whose last token sits at `after`, from the first draft (at after+1) and the
        MTP block's streams h [b, 1, hc, d] of the position before: each further draft reads the previous one with
        the block's own streams, and the block's cache is rolled back after."""
        e = self.engine
        drafts = [first]
        if k > 1:
            undo = Rollback(e.cache, self.mtp_layers, rows.slots, after, k - 1)
            for j in range(1, k):                                           # d_p'+j+1 from MTP position p'+j-1
                step = Step(start=after + j - 1, slots=rows.slots, cache=e.cache, n_new=1, block_table=table)
                logits, h = e.model.mtp_forward(h, drafts[-1][:, None], step)
                drafts.append(self.draft_tokens(logits[:, -1], rows, after + j + 1, greedy))
            undo.keep(torch.zeros_like(after))
        return torch.stack(drafts, dim=1)

    def draft_tokens(self, logits: torch.Tensor, rows: Rows, positions: torch.Tensor, greedy: bool) -> torch.Tensor:
        """The drafts [b] from MTP logits [b, vocab]: drawn as the main model draws at those positions, or, when every
        row is greedy, the argmax (what the sampler gives at temperature 0, in one kernel instead of its hundreds).
        Device work only; a draft is a guess, so any function of the logits keeps the output bits."""
        if greedy:
            return logits.argmax(dim=-1)
        return self.engine.draw(logits, *rows.sampling(), positions)[0]

    def _kept(self, drawn: torch.Tensor, accepted: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """Positions of the verification step that stay in the cache, as many as the tokens it emits: the current
        token and the accepted drafts, and none past the sequence's last token (EOS or its max_new_tokens), as
        plain decoding never reads it."""
        j = torch.arange(drawn.shape[1], device=drawn.device)
        eos = torch.where(drawn == self.engine.config.eos_token_id, j, drawn.shape[1]).min(dim=1).values
        return torch.minimum(torch.minimum(accepted, eos) + 1, left)


def _all_greedy(requests: list[Request]) -> bool:
    """Whether no request samples: its drafts are then an argmax (`Speculator.draft_tokens`)."""
    return all(r.temperature == 0 for r in requests)


def _ring_parts(store: PagedRows) -> list[torch.Tensor]:
    """A layer's KV row storage (codes, scales, RoPE dims), FP8 codes viewed as bytes: rows are put back as raw bits,
    with no FP8 indexing kernel needed on any device."""
    codes = store.codes.view(torch.uint8) if store.codes.dtype == torch.float8_e4m3fn else store.codes
    return [codes, store.scale, store.tail]
