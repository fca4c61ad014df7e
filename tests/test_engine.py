"""The engine: batches of different lengths, sampling, stopping, and bad requests."""
from __future__ import annotations

import pytest

from dsv4.engine import Request
from dsv4.errors import DSV4Error

from conftest import random_prompt, same_bits


def test_a_batch_of_different_lengths_decodes_each_request_as_if_alone(short_block):
    requests = [Request(random_prompt(n, n), max_new_tokens=6, request_id=i) for i, n in enumerate((5, 23, 11))]
    together = short_block.engine(max_batch=3).generate(requests, record_logits=True)
    for req, res in zip(requests, together):
        alone = short_block.engine(max_batch=1).generate([req], record_logits=True)[0]
        assert res.tokens == alone.tokens
        assert same_bits(res.logits, alone.logits)


def test_greedy_generation_takes_the_argmax(tiny):
    res = tiny.engine().generate([Request(random_prompt(7, 0), max_new_tokens=3)], record_logits=True)[0]
    assert res.tokens == [int(l.argmax()) for l in res.logits]


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(tiny):
    req = Request(random_prompt(7, 1), max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = tiny.engine(seed=5).generate([req])[0].tokens
    b = tiny.engine(seed=5).generate([req])[0].tokens
    c = tiny.engine(seed=6).generate([req])[0].tokens
    assert a == b and a != c


def test_generation_stops_at_max_tokens_or_eos(tiny):
    eos = tiny.config.eos_token_id
    res = tiny.engine().generate([Request(random_prompt(4, 2), max_new_tokens=5)])[0]
    assert len(res.tokens) == 5 and res.finish_reason == "length"
    engine = tiny.engine()
    engine.sample = lambda logits, requests, positions: [eos] * len(requests)   # the model "chooses" EOS at once
    res = engine.generate([Request(random_prompt(4, 2), max_new_tokens=5)])[0]
    assert res.tokens == [eos] and res.finish_reason == "eos"


@pytest.mark.parametrize("request_, message", [
    (Request([], 4), "empty prompt"),
    (Request([1] * 500, 20), "exceeds the context length of 512"),
    (Request([1, 999], 4), "prompt token 1 is 999, not an id of the vocabulary"),
    (Request([1], 4, temperature=-1.0), "temperature must be >= 0"),
    (Request([1], 0), "max_new_tokens must be >= 1"),
    (Request([1], -3), "max_new_tokens must be >= 1"),
    (Request([1], 4, top_p=float("nan")), "top_p must be a finite number"),
])
def test_bad_requests_are_refused_with_a_clear_error(tiny, request_, message):
    with pytest.raises(DSV4Error, match=message):
        tiny.engine().generate([request_])
