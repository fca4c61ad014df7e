"""Speculative decoding with the MTP block: it drafts up to N tokens per sequence, one main-model step verifies them
all, and the cache is rolled back exactly past the first rejection. It changes nothing but the speed.

A round, for a sequence whose last emitted token x_p sits at position p (the main model has read 0 .. p-1):
1. The MTP block catches up: it reads (main streams h_q, token x_q+1) at MTP position q for every q it has not read
   yet (the whole prompt after prefill, then the positions the last verification kept); its last logits draft
   d_p+1.
2. Further drafts chain through the block's own output streams: (h', d_p+j) at MTP position p+j-1 drafts d_p+j+1.
   These steps' cache rows are rolled back afterwards; step 1 of the next round writes those positions again from
   the main model's streams.
3. The main model reads x_p, d_p+1 .. d_p+k at positions p .. p+k in one step and draws a token at each with the
   key plain decoding draws it with, (seed, request, position). A draft is accepted iff it equals the main model's
   own token there; the accepted drafts and the main model's token after them are emitted (1 .. k+1 tokens).
4. Rollback (`Rollback`): the window-ring rows of the rejected positions get back what they held, and every
   compressor's open-block state gets back its rows and is fed the kept positions' rows the way one-token decode
   steps feed them, so the cache is the one plain decoding leaves. Compressed entries written for rejected positions
   belong to blocks that are not complete: no query reads them, and they are written again once complete.

Drafts are drawn with the main model's sampling key, so a good draft of a sampled token is accepted as often as a
greedy one. Wherever a verification step gives the bits of one-token decode steps (`batch-invariant` and `exact`,
docs/determinism.md) the tokens and logits are those of plain decoding; at `fast` and `deterministic` they may
differ within the kernels' tolerance (docs/speculative.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsv4.cache import CompressorState, KVCache
from dsv4.config import CSA_RATIO
from dsv4.diagnose import non_finite_error

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


class Rollback:
    """The cache state that a step over positions start[i] .. start[i]+n-1 of `slots` changes in `layers`, saved
    before the step (n at most the window), so that `keep` undoes it past each sequence's first kept[i] positions."""

    def __init__(self, cache: KVCache, layers: list[int], slots: torch.Tensor, start: torch.Tensor, n: int):
        window = cache.config.window_size
        self.slots, self.start = slots, start
        self.offsets = torch.arange(n, device=cache.device)
        self.rows = slots[:, None] * window + (start[:, None] + self.offsets) % window      # [b, n] ring rows
        self.stores = [cache.layers[i].kv for i in layers]
        self.saved_rows = [(s.codes[self.rows], s.scale[self.rows], s.tail[self.rows]) for s in self.stores]
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
        undo = self.offsets >= kept[:, None]
        rows = self.rows[undo]
        for store, (codes, scale, tail) in zip(self.stores, self.saved_rows):
            store.codes[rows], store.scale[rows], store.tail[rows] = codes[undo], scale[undo], tail[undo]
        for (state, ratio), (kv, score) in zip(self.states, self.saved_states):
            fed_kv = torch.cat([k for k, _ in state.journal], dim=1)
            fed_score = torch.cat([s for _, s in state.journal], dim=1)
            state.journal = None
            self._replay(state, ratio, kv, score, fed_kv, fed_score, kept)

    def _replay(self, state: CompressorState, ratio: int, kv: torch.Tensor, score: torch.Tensor,
                fed_kv: torch.Tensor, fed_score: torch.Tensor, kept: torch.Tensor) -> None:
        """The state rows of the slots := the saved ones, then the fed rows j < kept[i] (position start[i] + j)
        written as a one-token decode step writes them (model.Compressor._decode_blocks): row off + position % ratio
        of the current block; with overlap (ratio 4), a block completed becomes the previous block."""
        m, overlap = ratio, ratio == CSA_RATIO
        off = m if overlap else 0
        seq = torch.arange(kv.shape[0], device=kv.device)
        for j in range(fed_kv.shape[1]):
            live = (j < kept)[:, None]
            held = (self.start + j) % m
            row = off + held
            kv[seq, row] = torch.where(live, fed_kv[:, j], kv[seq, row])
            score[seq, row] = torch.where(live, fed_score[:, j], score[seq, row])
            if overlap:
                done = (live[:, 0] & (held == m - 1))[:, None, None]
                kv[:, :m] = torch.where(done, kv[:, off:], kv[:, :m])
                score[:, :m] = torch.where(done, score[:, off:], score[:, :m])
        state.kv[self.slots], state.score[self.slots] = kv, score


class Speculator:
    """An Engine's decode loop with MTP drafts of up to `drafts` tokens per sequence and step."""

    def __init__(self, engine: Engine, drafts: int):
        self.engine, self.drafts = engine, drafts
        self.stats = SpeculationStats()
        self.main_layers = list(range(engine.config.n_layers))
        self.mtp_layers = [engine.config.n_layers]

    @torch.inference_mode()
    def decode(self, live: dict[int, int], first_tokens: list[int], first_logits: list[torch.Tensor],
               streams: dict[int, torch.Tensor], requests: list[Request], results: list[Result], emit: Emit,
               progress: ProgressCallback | None) -> None:
        """Decode the prefilled requests in `live` (request index -> cache slot; `streams`: each prompt's final
        streams) to their end, every token through `emit`, which removes a finished request from `live`."""
        indices = list(live)
        unread = {i: streams[i][0] for i in indices}   # main streams at the positions the MTP block has not read
        mtp_from = dict.fromkeys(indices, 0)           # the first of those positions
        for i, token, row in zip(indices, first_tokens, first_logits):
            emit(i, token, row)
        while live:
            order = list(live)
            self._round(order, live, unread, mtp_from, requests, results, emit)
            if progress:
                progress("decode", sum(len(results[i].tokens) for i in indices),
                         sum(requests[i].max_new_tokens for i in indices))

    def _round(self, order: list[int], live: dict[int, int], unread: dict[int, torch.Tensor],
               mtp_from: dict[int, int], requests: list[Request], results: list[Result], emit: Emit) -> None:
        """Draft, verify, roll back and emit once for every sequence in `order`."""
        e = self.engine
        dev = e.device
        seqs = [requests[i].prompt + results[i].tokens for i in order]
        last = [len(s) - 1 for s in seqs]                                  # p: the position of x_p
        reqs, slots = [requests[i] for i in order], [live[i] for i in order]
        left = max(requests[i].max_new_tokens - len(results[i].tokens) for i in order)
        k = min(self.drafts, left - 1, e.config.max_seq_len - 1 - max(last))
        slot_t, last_t = torch.tensor(slots, device=dev), torch.tensor(last, device=dev)

        drafts: list[torch.Tensor] = []                                    # [b] each, on the device
        if k:
            logits, h = self._catch_up(order, seqs, last, slots, unread, mtp_from)
            drafts.append(self.draft_tokens(logits, reqs, [p + 1 for p in last]))
        if k > 1:
            undo = Rollback(e.cache, self.mtp_layers, slot_t, last_t, k - 1)
            for j in range(1, k):                                          # d_p+j+1 from MTP position p+j-1
                step = e.cache.step([p + j - 1 for p in last], slots, 1)
                logits, h = e.model.mtp_forward(h, drafts[-1][:, None], step)
                drafts.append(self.draft_tokens(logits[:, -1], reqs, [p + j + 1 for p in last]))
            undo.keep(torch.zeros_like(last_t))

        tokens = torch.cat([torch.tensor([s[-1] for s in seqs], device=dev)[:, None]] +
                           [d[:, None] for d in drafts], dim=1)           # [b, k+1]
        undo = Rollback(e.cache, self.main_layers, slot_t, last_t, k + 1)
        logits, h = e.step(tokens, last, slots, all_logits=True)          # [b, k+1, vocab], [b, k+1, hc, d]
        drawn = e.draw(logits.flatten(0, 1), [r for r in reqs for _ in range(k + 1)],
                       [p + 1 + j for p in last for j in range(k + 1)]).view(2, len(order), k + 1)
        accepted = (drawn[0, :, :k] == tokens[:, 1:]).long().cumprod(dim=1).sum(dim=1)
        undo.keep(self._kept(drawn[0], accepted, [requests[i].max_new_tokens - len(results[i].tokens)
                                                  for i in order]))
        chosen, finite, accepted_list = drawn[0].tolist(), drawn[1].tolist(), accepted.tolist()

        self.stats.steps += len(order)
        self.stats.drafted += k * len(order)
        self.stats.accepted += sum(accepted_list)
        for b, i in enumerate(order):
            for j in range(accepted_list[b] + 1):
                if not finite[b][j]:
                    raise non_finite_error(e.model, dev, requests[i].prompt + results[i].tokens, e.prefill_chunk)
                self.stats.emitted += 1
                e.timings.decode_tokens += 1
                if emit(i, chosen[b][j], logits[b, j]):
                    break
            kept = h[b, :accepted_list[b] + 1]
            if k:                                      # the MTP block has read up to p-1
                unread[i], mtp_from[i] = kept, last[b]
            else:
                unread[i] = torch.cat([unread[i], kept])

    def draft_tokens(self, logits: torch.Tensor, requests: list[Request], positions: list[int]) -> torch.Tensor:
        """The drafts [b] from MTP logits [b, vocab]: drawn as the main model draws at those positions."""
        return self.engine.draw(logits, requests, positions)[0]

    def _kept(self, chosen: torch.Tensor, accepted: torch.Tensor, left: list[int]) -> torch.Tensor:
        """Positions of the verification step that stay in the cache: the current token and the accepted drafts,
        and none past the sequence's last token (EOS or its max_new_tokens), as plain decoding never reads it."""
        j = torch.arange(chosen.shape[1], device=chosen.device)
        eos = torch.where(chosen == self.engine.config.eos_token_id, j, chosen.shape[1]).min(dim=1).values
        return torch.minimum(torch.minimum(accepted, eos) + 1, torch.tensor(left, device=chosen.device))

    def _catch_up(self, order: list[int], seqs: list[list[int]], last: list[int], slots: list[int],
                  unread: dict[int, torch.Tensor],
                  mtp_from: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block reads every sequence's unread positions (in chunks of the engine's prefill_chunk);
        (logits of each sequence's last position [b, vocab], the block's streams there [b, 1, hc, d]). Sequences
        with as many unread positions run as one batch."""
        e = self.engine
        groups: dict[int, list[int]] = {}
        for b, i in enumerate(order):
            groups.setdefault(last[b] - mtp_from[i], []).append(b)
        logits: list[torch.Tensor] = [None] * len(order)
        streams: list[torch.Tensor] = [None] * len(order)
        for n, members in groups.items():
            h = torch.stack([unread[order[b]] for b in members])
            ids = torch.tensor([seqs[b][mtp_from[order[b]] + 1:last[b] + 1] for b in members], device=e.device)
            chunk = e.prefill_chunk or n
            for begin in range(0, n, chunk):
                step = e.cache.step([mtp_from[order[b]] + begin for b in members], [slots[b] for b in members],
                                    min(chunk, n - begin))
                out_logits, out = e.model.mtp_forward(h[:, begin:begin + chunk], ids[:, begin:begin + chunk], step)
            for row, b in enumerate(members):
                logits[b], streams[b] = out_logits[row, -1], out[row, -1:]
        return torch.stack(logits), torch.stack(streams)
