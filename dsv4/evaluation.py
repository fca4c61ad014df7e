"""Held-out perplexity on the Python standard library, the corpus the embedded default model was trained on.

The corpus is every `.py` file under the running Python's `sysconfig.get_paths()["stdlib"]` (site-packages left
out), sorted by relative path; the files whose index in that list is a multiple of HELD_OUT_EVERY are held out
(never trained on). Each file's text (UTF-8, undecodable bytes replaced) is tokenised and cut into segments of
SEGMENT_TOKENS - 1 tokens; a segment is scored as BOS followed by it, every one of its tokens predicted, the first
one from BOS alone. Perplexity = exp(total NLL / scored tokens), the NLL taken in float64 on the host from the
model's fp32 logits, so two backends that return the same logits bits report the same perplexity bits.

tools/train_default.py uses the same file list, split and segments, so its training-time numbers are comparable.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.cache import KVCache
from dsv4.diagnose import non_finite_error
from dsv4.model import Transformer

HELD_OUT_EVERY = 20
SEGMENT_TOKENS = 512          # BOS + 511 scored tokens


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library at `root` (default: this Python's), sorted by relative path."""
    root = root or stdlib_root()
    relative = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                      if "site-packages" not in p.relative_to(root).parts)
    return [root / r for r in relative]


def split(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every HELD_OUT_EVERY-th file of the sorted list is held out."""
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY]
    held_out = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == 0]
    return train, held_out


def read_source(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def segments(token_lists: Sequence[Sequence[int]], bos_id: int, length: int = SEGMENT_TOKENS) -> list[list[int]]:
    """Each token list cut into pieces of length-1 tokens, each piece prefixed with BOS (the last may be shorter)."""
    step = length - 1
    return [[bos_id, *ids[i:i + step]] for ids in token_lists for i in range(0, len(ids), step)]


def evenly_spaced(items: list, count: int) -> list:
    """`count` items spread evenly over the list, first one included (all of them when count is 0 or too large)."""
    if count <= 0 or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


@dataclass
class Perplexity:
    nll_sum: float          # float64 sum of -log p(token) over every scored token
    tokens: int
    digest: str             # sha256 of the scored logits (fp32 bits), 16 hex digits

    @property
    def value(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def bits_per_token(self) -> float:
        return self.nll_sum / self.tokens / math.log(2)


@torch.inference_mode()
def perplexity(model: Transformer, segs: Sequence[Sequence[int]], device: torch.device, batch: int = 1,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Score every segment (BOS first, every later token predicted) with dsv4's inference model, `batch` segments
    per forward step (shorter ones padded at the end, which no earlier position can see)."""
    config = model.config
    cache = KVCache(config, batch, device)
    nll_sum, count, digest = 0.0, 0, hashlib.sha256()
    for first in range(0, len(segs), batch):
        group = segs[first:first + batch]
        width = max(len(s) for s in group)
        tokens = torch.tensor([list(s) + [config.eos_token_id] * (width - len(s)) for s in group])
        for slot in range(len(group)):
            cache.reset(slot)
        step = cache.step([0] * len(group), list(range(len(group))), width)
        logits, _ = model(tokens.to(device), step, all_logits=True)
        logits = logits.float().cpu()
        for row, seg in enumerate(group):
            scored = logits[row, :len(seg) - 1]
            if not bool(torch.isfinite(scored).all()):
                raise non_finite_error(model, device, list(seg))
            targets = torch.tensor(seg[1:])
            log_probs = torch.log_softmax(scored.double(), dim=-1)
            nll_sum += -float(log_probs.gather(1, targets[:, None]).sum())
            count += len(targets)
            digest.update(scored.contiguous().numpy().tobytes())
        if progress:
            progress(min(first + batch, len(segs)), len(segs))
    return Perplexity(nll_sum, count, digest.hexdigest()[:16])
