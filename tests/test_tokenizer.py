"""The byte-level tokenizer of random checkpoints and the streaming decoder."""
from __future__ import annotations

import random

import pytest

from dsv4.config import preset
from dsv4.errors import DSV4Error
from dsv4.tokenizer import BOS_TOKEN, EOS_TOKEN, IncrementalDecoder, Tokenizer, byte_level_tokenizer_json

SAMPLES = ["", "hello world", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "héllo wörld",
           "日本語のテキスト", "emoji 🙂👍🏽 and a family 👨‍👩‍👧", "\x00\x01\x7f control bytes", "Ġ Ċ ĉ byte-level lookalikes",
           "<|unused_258|> and " + BOS_TOKEN]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    config = preset("tiny")
    return Tokenizer.from_str(byte_level_tokenizer_json(config.vocab_size, config.bos_token_id, config.eos_token_id))


def _random_text(rng: random.Random, n: int) -> str:
    """Characters from every UTF-8 length: ASCII, 2-byte, 3-byte (CJK) and 4-byte (emoji)."""
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_ids_are_the_utf8_bytes_and_special_tokens_sit_at_the_config_ids(tok):
    rng = random.Random(0)
    for text in SAMPLES[:-1] + [_random_text(rng, 200) for _ in range(20)]:
        assert tok.encode(text) == list(text.encode("utf-8"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 260)
    assert tok.decode([256, 257, 259]) == BOS_TOKEN + EOS_TOKEN + "<|unused_259|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_decode_round_trips_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(50):
        text = _random_text(rng, rng.randint(0, 300))
        assert tok.decode(tok.encode(text)) == text


def test_streaming_emits_only_whole_characters_and_reassembles_the_text(tok):
    rng = random.Random(2)
    for text in SAMPLES + [_random_text(rng, 100) for _ in range(10)]:
        stream = IncrementalDecoder(tok)
        pieces = [stream.push(i) for i in tok.encode(text)]
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) + stream.finish() == text


def test_streaming_holds_back_a_character_until_its_last_byte(tok):
    stream = IncrementalDecoder(tok)
    assert [stream.push(b) for b in "a🙂".encode()] == ["a", "", "", "", "🙂"]
    assert [stream.push(b) for b in "é".encode()] == ["", "é"]
    assert stream.finish() == ""


def test_streaming_flushes_invalid_bytes_as_replacement_characters(tok):
    stream = IncrementalDecoder(tok)
    assert stream.push(0xF0) == "" and stream.push(0x9F) == ""     # an emoji cut short ...
    assert stream.push(ord("x")) == "\ufffdx"                       # ... is replaced once text resumes
    assert stream.push(0xE6) == ""
    assert stream.finish() == "\ufffd"                              # and at the end of the stream


def test_tokenizer_json_round_trips_through_a_file(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    path.write_text(byte_level_tokenizer_json(260, 256, 257))
    loaded = Tokenizer.from_file(path)
    assert loaded.encode("héllo 🙂") == tok.encode("héllo 🙂") and loaded.bos_id == 256


@pytest.mark.parametrize("bos, eos", [(0, 1), (256, 256), (256, 300)])
def test_special_ids_must_be_distinct_and_above_the_bytes(bos, eos):
    with pytest.raises(DSV4Error, match="bos"):
        byte_level_tokenizer_json(260, bos, eos)


def test_bad_tokenizer_files_raise_dsv4_error(tmp_path):
    with pytest.raises(DSV4Error, match="tokenizer .*absent.json does not exist"):
        Tokenizer.from_file(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DSV4Error, match="bad.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
