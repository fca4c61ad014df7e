"""Speculative decoding with the MTP block changes nothing but the speed: at `exact` the tokens, their logits and the
cache the main model leaves are the bits of plain decoding, whatever the drafts (the MTP block's own, all right, all
wrong, or right at some positions only), for batches of different lengths that cross the window and compression
blocks; bad settings are refused before any work."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import dsv4
from dsv4.checkpoint import CONFIG_FILE, TOKENIZER_FILE
from dsv4.config import preset
from dsv4.engine import Engine, Request
from dsv4.errors import DSV4Error
from dsv4.tokenizer import byte_level_tokenizer_json

from conftest import random_prompt, same_bits
from test_cli import _one_line_error, dsv4 as dsv4_cli


def _requests(new_tokens: int = 22) -> list[Request]:
    """Different lengths, greedy and sampled; decoding crosses the window (16) and many compression blocks (CSA 4,
    HCA 8 in short_block)."""
    return [Request(random_prompt(n, i), max_new_tokens=new_tokens, temperature=t, top_p=p, request_id=i)
            for i, (n, t, p) in enumerate([(5, 0.0, 1.0), (23, 0.9, 0.9), (11, 0.0, 1.0)])]


def _same(a, b) -> bool:
    return all(x.tokens == y.tokens and x.finish_reason == y.finish_reason and same_bits(x.logits, y.logits)
               for x, y in zip(a, b))


def _main_cache(engine: Engine) -> list[torch.Tensor]:
    """What the main model keeps between steps and reads as it is, for every sequence slot (the scratch slot that
    pads batches and takes a rollback's discarded writes holds nothing): every layer's window ring and compressor
    states (compressed entries are read only once complete, and complete entries follow from these)."""
    parts, slots = [], engine.cache.scratch_slot
    for layer in engine.cache.layers[:engine.config.n_layers]:
        ring = slots * layer.window
        parts += [layer.kv.codes[:ring], layer.kv.scale[:ring], layer.kv.tail[:ring]]
        parts += [t[:slots] for state in (layer.compressor, layer.indexer) if state is not None
                  for t in (state.kv, state.score)]
    return parts


def _oracle(plain, requests, right, device="cpu") -> callable:
    """Drafts that are the plain run's token where right(position), and a different token elsewhere: a table on
    the device, so that the drafts are drawn inside captured rounds too."""
    length = max(len(r.prompt) + len(res.tokens) for r, res in zip(requests, plain)) + 1
    table = torch.zeros(max(r.request_id for r in requests) + 1, length, dtype=torch.int64)
    for r, res in zip(requests, plain):
        for j, t in enumerate(res.tokens):
            table[r.request_id, len(r.prompt) + j] = t
    for p in range(length):
        if not right(p):
            table[:, p] = (table[:, p] + 1) % 256
    table = table.to(device)

    def draft_tokens(logits, rows, positions, greedy):
        return table[rows.request, positions.clamp(max=length - 1)]
    return draft_tokens


@pytest.fixture(scope="module")
def plain_run(short_block):
    engine = short_block.engine(max_batch=3)
    return engine.generate(_requests(), record_logits=True), _main_cache(engine)


@pytest.mark.parametrize("drafts", [1, 3])
def test_mtp_drafts_give_the_tokens_logits_and_cache_of_plain_decoding_at_exact(short_block, plain_run, drafts):
    plain, cache = plain_run
    engine = short_block.engine(max_batch=3, speculate=drafts)
    assert _same(engine.generate(_requests(), record_logits=True), plain)
    assert same_bits(_main_cache(engine), cache)
    assert engine.speculator.stats.drafted > 0


@pytest.mark.parametrize("case, right, chunk", [("all accepted", lambda p: True, None),
                                                ("all rejected", lambda p: False, None),
                                                ("accepted counts differing per sequence", lambda p: p % 3 != 1, 7)])
def test_accepted_and_rejected_drafts_leave_the_bits_of_plain_decoding(short_block, plain_run, case, right, chunk):
    plain, cache = plain_run
    engine = short_block.engine(max_batch=3, prefill_chunk=chunk, speculate=3)
    engine.speculator.draft_tokens = _oracle(plain, _requests(), right)
    assert _same(engine.generate(_requests(), record_logits=True), plain)
    assert same_bits(_main_cache(engine), cache)
    stats = engine.speculator.stats
    if case == "all accepted":
        assert stats.accepted == stats.drafted and stats.tokens_per_step > 3
    elif case == "all rejected":
        assert stats.accepted == 0 and stats.tokens_per_step == 1
    else:
        assert 0 < stats.accepted < stats.drafted


def test_a_long_prompt_speculates_across_an_hca_block_and_up_to_its_last_token(tiny):
    requests = [Request(random_prompt(121, 7), max_new_tokens=12, temperature=0.7, request_id=7),
                Request(random_prompt(3, 8), max_new_tokens=5, request_id=8)]
    plain = tiny.engine(max_batch=2).generate(requests, record_logits=True)
    engine = tiny.engine(max_batch=2, speculate=2)
    engine.speculator.draft_tokens = _oracle(plain, requests, lambda p: p % 4 != 0)
    assert _same(engine.generate(requests, record_logits=True), plain)
    assert [len(r.tokens) for r in plain] == [12, 5]


def test_the_api_completes_the_same_text_with_speculation(tiny):
    prompt = "def add(a, b):"
    assert tiny.complete(prompt, max_new_tokens=10, speculate=2) == tiny.complete(prompt, max_new_tokens=10)


@pytest.mark.parametrize("drafts, message", [(-1, "speculate must be >= 0, got -1"),
                                             (16, "speculate 16 must be below the window size (16)"),
                                             (2.0, "speculate must be an integer, got 2.0")])
def test_bad_speculate_values_are_refused(tiny, drafts, message):
    with pytest.raises(DSV4Error, match=re.escape(message)):
        tiny.engine(speculate=drafts)


def test_run_and_serve_refuse_to_speculate_without_an_mtp_block_before_reading_any_weights(tmp_path):
    config = dataclasses.replace(preset("tiny"), n_mtp_layers=0, compress_ratios=(0, 4, 128, 4))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config.to_json()))      # no weights at all
    (tmp_path / TOKENIZER_FILE).write_text(byte_level_tokenizer_json(config.vocab_size, config.bos_token_id,
                                                                     config.eos_token_id))
    _one_line_error(dsv4_cli("run", "--model", str(tmp_path), "--speculate", "2"),
                    "needs the MTP block to draft with, and this checkpoint has none (n_mtp_layers is 0)")
    _one_line_error(dsv4_cli("run", "--model", str(tmp_path), "--speculate", "-1"), "'--speculate'")
    _one_line_error(dsv4_cli("serve", "--model", str(tmp_path), "--speculate", "1"),
                    "needs the MTP block to draft with, and this checkpoint has none (n_mtp_layers is 0)")


def test_run_reports_acceptance_with_speculate(tiny_dir):
    proc = dsv4_cli("run", "--model", str(tiny_dir), "--determinism", "exact", "--max-new-tokens", "6", "--quiet",
               "--speculate", "2")
    assert proc.returncode == 0, proc.stderr
    assert "of drafts accepted" in proc.stderr and "tokens per verification step" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("level", ["batch-invariant", "exact"])
def test_speculation_on_the_gpu_gives_the_bits_of_plain_decoding(level, short_block_dir):
    pipe = dsv4.load(short_block_dir, device="cuda", determinism=level)
    plain = Engine(pipe.model, "cuda", max_batch=3).generate(_requests(), record_logits=True)   # CUDA graphs
    for drafts in (1, 3):
        engine = Engine(pipe.model, "cuda", max_batch=3, speculate=drafts)
        assert _same(engine.generate(_requests(), record_logits=True), plain)
        oracle = Engine(pipe.model, "cuda", max_batch=3, speculate=drafts)
        oracle.speculator.draft_tokens = _oracle(plain, _requests(), lambda p: p % 3 != 1, "cuda")
        assert _same(oracle.generate(_requests(), record_logits=True), plain)


def test_the_benchmark_reports_acceptance_and_speed_up_against_plain_decoding(tiny_dir):
    from dsv4.backends.levels import Level
    from dsv4.benchmarks import speculate

    result = speculate.run(str(tiny_dir), "cpu", (Level.EXACT,), (1, 2), (1,), prompt_tokens=12, new_tokens=5,
                           temperature=0.0)
    rows = result["rows"]
    assert [(r["batch"], r["drafts"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["identical"] for r in rows) and all(r["decode_tokens"] == 4 * r["batch"] for r in rows)
    assert all(r["speedup"] == 1.0 and r["tokens_per_step"] == 1.0 for r in rows if not r["drafts"])
    assert "speed-up" in speculate.table(result)


@pytest.mark.parametrize("device, level", [
    ("cpu", "exact"),
    pytest.param("cuda", "batch-invariant", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])])
def test_the_server_speculates_to_the_tokens_and_logprobs_of_plain_serving(device, level):
    """Continuous batching with speculation: requests join a running batch with their own first drafts, share a
    cached prefix (the MTP block's rows come with it) and end at EOS or their length; every token and logprob is
    the plain server's."""
    from dsv4.serve.scheduler import Scheduler

    pipe = dsv4.load(device=device, determinism=level)
    prefix = [256] + list(b"import sys\n\n\ndef main(argv):\n    return len(argv)\n" * 6)[:255]   # one cache block
    prompts = [prefix + list(b"\nif __name__ == '__main__':\n"), [256] + list(b"def add(a, b):\n"),
               prefix + list(b"\n\ndef helper():\n"), [256] + list(b"for i in range(10):\n")]
    requests = [Request(p, max_new_tokens=n, temperature=t, request_id=i)
                for i, (p, n, t) in enumerate(zip(prompts, [12, 7, 9, 10], [0.0, 0.8, 0.0, 0.6]))]

    def serve(speculate: int):
        scheduler = Scheduler(pipe, max_batch=2, speculate=speculate).start()
        try:
            streams = [scheduler.stream(r, top_logprobs=2) for r in requests]
            tokens = [[(t.token, t.logprob, t.top) for t in s] for s in streams]
            return tokens, [s.finished for s in streams], scheduler.status()
        finally:
            scheduler.close()

    plain, plain_finished, _ = serve(0)
    tokens, finished, status = serve(2)
    assert tokens == plain and finished == plain_finished
    assert status["prefix_cache"]["memory_hits"] > 0 and status["speculation"]["acceptance_rate"] > 0
