"""Checks at the edge: every input is checked before any work starts, and a bad one is a DSV4Error naming it.

The command line's click types and the Python API call the same functions, so a library user gets the same one-line
message as a user of `dsv4`, never an IndexError from deep inside a run. Groups, top to bottom: numbers, devices,
text and token ids, generation requests, paths and files, and schemas of JSON/TOML files.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4.errors import DSV4Error

if TYPE_CHECKING:
    import torch

    from dsv4.config import ModelConfig
    from dsv4.engine import Request

SEED_LIMIT = 1 << 64           # sampling seeds are used modulo 2^64 (the counter-based generator's key)
REQUEST_ID_LIMIT = 1 << 63     # request ids travel as int64
PROMPT_IDS_OPTION = "--prompt-ids"
_DEVICE = re.compile(r"([a-z][a-z0-9_]*)(?::(\d+))?")


# -- numbers --------------------------------------------------------------------------------------------------------
def integer(value: Any, name: str, minimum: int | None = None, below: int | None = None) -> int:
    """An int (a bool is not one) with minimum <= value < below."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise DSV4Error(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum or below is not None and value >= below:
        bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                          f"< {below}" if below is not None else "") if b)
        raise DSV4Error(f"{name} must be {bounds}, got {value}")
    return value


def number(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite int or float (not a bool, NaN or infinity) with minimum <= value <= maximum."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DSV4Error(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DSV4Error(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                          f"<= {maximum}" if maximum is not None else "") if b)
        raise DSV4Error(f"{name} must be {bounds}, got {value}")
    return float(value)


BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
              "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def byte_size(text: Any) -> int:
    """A size in bytes from text like 4096, 512MiB, 2GB or 1.5G (decimal k/M/G/T, binary Ki/Mi/Gi/Ti; B optional)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise DSV4Error(f"{text!r} is not a size such as 4096, 512MiB or 2GB")
    return int(float(match[1]) * BYTE_UNITS[(match[2] or "").lower()])


def seed(value: Any) -> int:
    return integer(value, "seed", 0, SEED_LIMIT)


# -- devices --------------------------------------------------------------------------------------------------------
def device(text: Any) -> str:
    """A device string `type` or `type:index` (cpu, cuda:1, npu:0, a vendor plugin's type). Whether a backend serves
    the type is the registry's to say; whether the index exists, `device_present`'s."""
    if not isinstance(text, str) or not _DEVICE.fullmatch(text):
        raise DSV4Error(f"device {text!r} is not of the form type[:index], e.g. cpu, cuda or cuda:1")
    return text


def device_present(dev: torch.device) -> None:
    """The device's index exists on this machine (checked where torch can count the devices of its type)."""
    import torch

    module = getattr(torch, dev.type, None)
    count = getattr(module, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise DSV4Error(f"device {dev} does not exist: this machine has {count()} {dev.type} device(s), "
                        f"indexed from 0")


# -- text and token ids ---------------------------------------------------------------------------------------------
def text(value: Any, name: str = "prompt") -> str:
    """Text that is valid Unicode and so encodes as UTF-8. Command-line bytes that are not UTF-8 reach Python as lone
    surrogates (surrogateescape); the message names the original bytes and how to pass them instead."""
    if not isinstance(value, str):
        raise DSV4Error(f"{name} must be text (str), got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start:e.end]
        try:
            shown = "bytes " + " ".join(f"0x{b:02x}" for b in bad.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            shown = "code points " + " ".join(f"U+{ord(c):04X}" for c in bad)
        raise DSV4Error(f"{name} is not valid UTF-8: {shown} at character {e.start}; give UTF-8 text, or the prompt "
                        f"as token ids ({PROMPT_IDS_OPTION} 1,2,3 on the command line, a list of ints in Python)"
                        ) from None
    return value


def parse_token_ids(text_ids: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]: a prompt given as comma-separated token ids."""
    try:
        ids = [int(part) for part in text_ids.split(",")]
    except ValueError:
        raise DSV4Error(f"token ids must be comma-separated integers, e.g. 15,1072,25; got {text_ids!r}") from None
    return ids


def token_ids(ids: Any, vocab_size: int, name: str = "prompt") -> list[int]:
    """A non-empty sequence of ints, each an id of the vocabulary."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise DSV4Error(f"{name} token ids must be a list of ints, got {type(ids).__name__}")
    if not ids:
        raise DSV4Error(f"empty {name}: at least one token is needed")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise DSV4Error(f"{name} token {i} is {t!r}, not an id of the vocabulary (0 to {vocab_size - 1})")
    return list(ids)


# -- generation -----------------------------------------------------------------------------------------------------
def sampling(max_new_tokens: Any, temperature: Any, top_p: Any) -> None:
    """At least one new token; temperature >= 0 (0: greedy); top_p in [0, 1] (0 keeps only the likeliest token)."""
    integer(max_new_tokens, "max_new_tokens", minimum=1)
    number(temperature, "temperature", minimum=0)
    number(top_p, "top_p", minimum=0, maximum=1)


def request(config: ModelConfig, req: Request) -> None:
    """A generation request the model can serve: valid token ids and settings, and prompt plus new tokens within
    the context."""
    token_ids(req.prompt, config.vocab_size)
    sampling(req.max_new_tokens, req.temperature, req.top_p)
    integer(req.request_id, "request_id", 0, REQUEST_ID_LIMIT)
    if len(req.prompt) + req.max_new_tokens > config.max_seq_len:
        raise DSV4Error(f"prompt of {len(req.prompt)} tokens plus {req.max_new_tokens} new tokens exceeds the context "
                        f"length of {config.max_seq_len}")


def engine_settings(seed_value: Any, max_batch: Any, prefill_chunk: Any) -> None:
    seed(seed_value)
    if max_batch is not None:
        integer(max_batch, "max_batch", minimum=1)
    if prefill_chunk is not None:
        integer(prefill_chunk, "prefill_chunk", minimum=1)


def speculate(config: ModelConfig, drafts: Any, expert_parallel: bool = False) -> None:
    """Speculative decoding drafts with the MTP block, at most window_size - 1 tokens a step (a verification step's
    ring rows are rolled back in place, so its positions must not wrap the window), in one process."""
    integer(drafts, "speculate", minimum=0)
    if drafts >= config.window_size:
        raise DSV4Error(f"speculate {drafts} must be below the window size ({config.window_size}): a verification "
                        f"step of {drafts + 1} positions would wrap the window ring it rolls back")
    if drafts and config.n_mtp_layers == 0:
        raise DSV4Error(f"speculate {drafts} needs the MTP block to draft with, and this checkpoint has none "
                        f"(n_mtp_layers is 0)")
    if drafts and expert_parallel:
        raise DSV4Error("speculate is not supported with expert parallelism (--nproc > 1) yet")


# -- paths and files ------------------------------------------------------------------------------------------------
def directory(path: Any, name: str) -> Path:
    """An existing, readable directory."""
    path = Path(path)
    if not path.exists():
        raise DSV4Error(f"{name} {path} does not exist")
    if not path.is_dir():
        raise DSV4Error(f"{name} {path} is a file, not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DSV4Error(f"{name} {path} is not readable (permission denied)")
    return path


def input_file(path: Any, name: str) -> Path:
    """An existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise DSV4Error(f"{name} {path} does not exist")
    if path.is_dir():
        raise DSV4Error(f"{name} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise DSV4Error(f"{name} {path} is not readable (permission denied)")
    return path


def output_file(path: Any, name: str = "output file") -> Path:
    """A file that can be written now: not a directory, in an existing writable directory, writable if it exists.
    Checked before the work whose result it will hold."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise DSV4Error(f"cannot write {name} {path}: it is a directory")
    if not parent.is_dir():
        raise DSV4Error(f"cannot write {name} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or path.exists() and not os.access(path, os.W_OK):
        raise DSV4Error(f"cannot write {name} {path}: permission denied")
    return path


def read_bytes(path: Any, name: str) -> bytes:
    """A file's bytes; missing, directory, unreadable and empty files are each named as such."""
    path = input_file(path, name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DSV4Error(f"cannot read {name} {path}: {e.strerror or e}") from None
    if not data:
        raise DSV4Error(f"{name} {path} is empty")
    return data


def read_text(path: Any, name: str) -> str:
    """A file's text, which must be UTF-8 (the byte offset of the first bad byte is named)."""
    data = read_bytes(path, name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DSV4Error(f"{name} {path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}") from None


# -- schemas --------------------------------------------------------------------------------------------------------
def unknown_key(key: str, known: Iterable[str], where: str) -> DSV4Error:
    """The error for a key that is not part of a schema, suggesting the closest known key."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DSV4Error(f"{where}: unknown key {key!r}{hint}")


def typed(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against a type hint (str, bool, int, float, dict, dict[str, X], list[X], tuple[X, ...], or a
    dataclass read from a JSON object); lists become tuples for tuple hints, objects become dataclasses."""
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, name)
    if hint is float:
        return number(value, name)
    if hint is int:
        return integer(value, name)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        items = [typed(item, args[0], f"{name}[{i}]") for i, item in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        if not args:
            return value
        return {typed(k, args[0], f"{name} key"): typed(v, args[1], f"{name}[{k!r}]") for k, v in value.items()}
    if origin in (str, bool) and type(value) is origin:
        return value
    expected = {str: "a string", bool: "true or false", list: "a list", tuple: "a list", dict: "an object"}
    raise DSV4Error(f"{name} must be {expected.get(origin, origin)}, got {value!r}")


def from_json(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a JSON object: every key known, every field without a default present, every value of its
    field's type. Errors name the offending field."""
    if not isinstance(data, dict):
        raise DSV4Error(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key(key, fields, where)
    hints = typing.get_type_hints(cls)
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DSV4Error(f"{where}: missing field {missing[0]!r}")
    return cls(**{key: typed(value, hints[key], f"{where}: field {key!r}") for key, value in data.items()})
