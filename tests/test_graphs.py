"""Decode steps padded to a bucket size (rows of the scratch slot) and replayed as CUDA graphs give the bits of
plain eager decoding."""
from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.backends.levels import LEVEL_NAMES
from dsv4.engine import Engine, Request, bucket_sizes

from conftest import random_prompt


def _requests() -> list[Request]:
    # lengths that cross the window (16) and an HCA block (128) while decoding; different sampling settings
    return [Request(random_prompt(n, i), max_new_tokens=14, temperature=t, request_id=i)
            for i, (n, t) in enumerate([(5, 0.0), (120, 0.8), (17, 0.0)])]


def _same(a, b) -> bool:
    return all(x.tokens == y.tokens and all(torch.equal(p.view(torch.int32), q.view(torch.int32))
                                            for p, q in zip(x.logits, y.logits)) for x, y in zip(a, b))


def test_bucket_sizes_are_powers_of_two_up_to_the_batch():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]


def test_padding_a_decode_batch_with_the_scratch_slot_keeps_the_bits_at_exact(tiny):
    plain = Engine(tiny.model, "cpu", max_batch=4).generate(_requests(), record_logits=True)
    padded = Engine(tiny.model, "cpu", max_batch=4)
    padded.buckets = [4]                     # every step runs 4 rows: the live ones, then scratch rows
    assert _same(padded.generate(_requests(), record_logits=True), plain)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("level", LEVEL_NAMES)
def test_graph_replay_gives_the_eager_bits_at_every_level(level, tiny_dir):
    pipe = dsv4.load(tiny_dir, device="cuda", determinism=level)
    graphed = Engine(pipe.model, "cuda", max_batch=4, graphs=True)
    eager = Engine(pipe.model, "cuda", max_batch=4, graphs=False)
    assert graphed.graphs and not eager.graphs
    assert _same(graphed.generate(_requests(), record_logits=True), eager.generate(_requests(), record_logits=True))
