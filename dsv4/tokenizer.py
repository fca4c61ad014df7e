"""Text <-> token ids: a thin wrapper over the `tokenizers` library, plus the byte-level tokenizer of random models.

The official DeepSeek `tokenizer.json` is a byte-level BPE; its begin/end-of-sentence tokens are found by name. Models
written by `dsv4.checkpoint.write_checkpoint` get `byte_level_tokenizer_json`: token id b is the byte b, so any UTF-8
text round-trips, and the same two special-token names mark BOS and EOS.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from dsv4 import validate
from dsv4.errors import DSV4Error

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
N_BYTES = 256


class Tokenizer:
    """encode/decode without adding special tokens; `bos_id`/`eos_id` are the ids of DeepSeek's BOS/EOS tokens."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self._tok = tok
        self.bos_id = self._special_id(BOS_TOKEN)
        self.eos_id = self._special_id(EOS_TOKEN)

    @classmethod
    def from_str(cls, json_text: str, source: str = "tokenizer.json") -> "Tokenizer":
        try:
            tok = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise DSV4Error(f"{source} is not a valid tokenizer.json: {e}") from None
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls.from_str(validate.read_text(path, "tokenizer"), source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Every id becomes text, special tokens included, so decode(encode(s)) == s for any s."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _special_id(self, name: str) -> int:
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise DSV4Error(f"tokenizer has no {name} token")
        return token_id


class IncrementalDecoder:
    """Streams text while ids arrive: `push` returns only whole characters, holding back the bytes of a character
    whose remaining bytes are still to come; `finish` returns whatever is left (incomplete bytes as U+FFFD).

    Each step decodes only the ids since the last clean boundary (the scheme vLLM uses), so streaming is linear in
    the length of the output and exact for decoders whose output depends on neighbouring tokens. A piece that
    really ends in U+FFFD is indistinguishable from an incomplete character and waits for the next id or `finish`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were already emitted; they give context for the next piece
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # the last character is not complete yet
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def finish(self) -> str:
        done = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


def byte_level_tokenizer_json(vocab_size: int, bos_id: int, eos_id: int) -> str:
    """A tokenizer.json whose ids 0..255 are the bytes (ByteLevel BPE without merges), BOS/EOS special tokens at
    `bos_id`/`eos_id`, and unused special padding tokens `<|unused_{id}|>` on every other id below `vocab_size`."""
    if not (N_BYTES <= bos_id < vocab_size and N_BYTES <= eos_id < vocab_size and bos_id != eos_id):
        raise DSV4Error(f"byte-level tokenizer needs distinct bos/eos ids in [{N_BYTES}, vocab_size={vocab_size}), "
                        f"got bos={bos_id}, eos={eos_id}")
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = {bos_id: BOS_TOKEN, eos_id: EOS_TOKEN}
    # Added tokens take the next free ids in order, so adding them by increasing id puts each at its id.
    tok.add_special_tokens([AddedToken(names.get(i, f"<|unused_{i}|>"), special=True, normalized=False)
                            for i in range(N_BYTES, vocab_size)])
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that ByteLevel uses: printable Latin-1 bytes map to themselves, the
    rest to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(N_BYTES):
        if b not in mapping:
            mapping[b] = chr(N_BYTES + extra)
            extra += 1
    return mapping
