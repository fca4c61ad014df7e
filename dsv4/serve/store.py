"""The prefix cache on disk: one file per cached prompt block, so shared prefixes survive a restart.

A file holds what a block of a prompt leaves in the KV cache (its pool rows in every layer, dsv4.cache.KVCache
.block_rows) and the slot state at the block's end (KVCache.slot_state), as a header line then safetensors bytes:

    DSV4PREFIX <format version> <sha256 of the safetensors bytes>\\n<safetensors bytes>

The safetensors metadata names the model key (dsv4.serve.prefix.model_key), the block's chain key (its file name)
and the block's token ids; a file is used only if every one of these matches and the checksum holds, otherwise it
is ignored with a warning and the block is computed again. Files live in DIR/<model key>/, are written to a
temporary name and renamed into place (a crash mid-write leaves no file that is ever read), and the directory is
kept under its size cap by deleting the least recently used files. Any OS error while writing (a full disk, an
unwritable directory) turns persistence off with one warning; serving goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as st_load, save as st_save

FORMAT_VERSION = 1
MAGIC = b"DSV4PREFIX"
SUFFIX = ".prefix"


class PrefixStore:
    """Prefix-cache files of one model under `root`, at most `max_bytes` in all."""

    def __init__(self, root: Path, model_key: str, max_bytes: int, warn: Callable[[str], None]):
        self.model_key, self.max_bytes, self._warn = model_key, max_bytes, warn
        self.dir = Path(root) / model_key
        self.enabled = True
        self._sizes: dict[str, int] = {}          # file name -> bytes, oldest use first
        self._bad: set[str] = set()               # keys whose file was refused (warned once) until rewritten
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            files = sorted(self.dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
            self._sizes = {p.name: p.stat().st_size for p in files}
        except OSError as e:
            self._disable(e)

    def _disable(self, error: OSError) -> None:
        self.enabled = False
        self._warn(f"prefix cache directory {self.dir} is not usable ({error.strerror or error}); "
                   f"prefixes are kept in memory only")

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def save(self, key: str, tokens: list[int], rows: list[torch.Tensor], state: list[torch.Tensor]) -> None:
        """Write block `key` atomically (tmp + fsync + rename), evicting old files to stay under the cap."""
        if not self.enabled:
            return
        tensors = {f"rows.{i}": t.cpu().contiguous() for i, t in enumerate(rows)}
        tensors |= {f"state.{i}": t.cpu().contiguous() for i, t in enumerate(state)}
        payload = st_save(tensors, metadata={"model": self.model_key, "key": key,
                                             "tokens": ",".join(map(str, tokens))})
        data = b"%s %d %s\n" % (MAGIC, FORMAT_VERSION, hashlib.sha256(payload).hexdigest().encode()) + payload
        if len(data) > self.max_bytes:
            return
        name = key + SUFFIX
        self._sizes.pop(name, None)
        while self._sizes and self.used_bytes + len(data) > self.max_bytes:
            oldest = next(iter(self._sizes))
            del self._sizes[oldest]
            (self.dir / oldest).unlink(missing_ok=True)
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._disable(e)
            return
        self._sizes[name] = len(data)
        self._bad.discard(key)

    def load(self, key: str, tokens: list[int], rows_like: list[torch.Tensor],
             state_like: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Block `key`'s (rows, state) if its file exists and is valid for this model and these tokens; a file
        that exists but is not is ignored with one warning (and not read again until it is rewritten)."""
        path = self.dir / (key + SUFFIX)
        if not self.enabled or key in self._bad or not path.is_file():
            return None
        try:
            data = path.read_bytes()
            os.utime(path)
        except OSError as e:
            problem = e.strerror or str(e)
        else:
            found, problem = _parse(data, self.model_key, key, tokens, rows_like, state_like)
        if problem:
            self._bad.add(key)
            self._warn(f"ignoring prefix-cache file {path}: {problem}; recomputing")
            return None
        self._sizes[path.name] = self._sizes.pop(path.name, len(data))    # now the most recently used
        return found


def _parse(data: bytes, model_key: str, key: str, tokens: list[int], rows_like: list[torch.Tensor],
           state_like: list[torch.Tensor]) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]] | None, str]:
    """(rows, state), "" for a valid file; None and what is wrong otherwise."""
    header, _, payload = data.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 3 or fields[0] != MAGIC:
        return None, "not a dsv4 prefix-cache file"
    if fields[1] != str(FORMAT_VERSION).encode():
        return None, f"format version {fields[1].decode(errors='replace')}, this dsv4 writes {FORMAT_VERSION}"
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        return None, "checksum mismatch (the file is corrupt)"
    try:
        tensors = st_load(payload)
        metadata = _metadata(payload)
    except Exception as e:   # safetensors raises its own error types for malformed bytes
        return None, f"unreadable ({e})"
    if metadata.get("model") != model_key:
        return None, "written for another model, format or determinism level"
    if metadata.get("key") != key or metadata.get("tokens") != ",".join(map(str, tokens)):
        return None, "its tokens are not this prefix's"
    rows = [tensors.get(f"rows.{i}") for i in range(len(rows_like))]
    state = [tensors.get(f"state.{i}") for i in range(len(state_like))]
    for got, like in zip(rows + state, rows_like + state_like):
        if got is None or got.shape != like.shape or got.dtype != like.dtype:
            return None, "its tensors do not fit this model's cache"
    return (rows, state), ""


def _metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__."""
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + size]).get("__metadata__", {})
