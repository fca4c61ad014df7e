"""Determinism levels. Each level includes the promises of the ones before it (see docs/determinism.md)."""
from __future__ import annotations

import enum

from dsv4.errors import DSV4Error


class Level(enum.IntEnum):
    FAST = 0             # best kernel per device; within the op's tolerance of the reference
    DETERMINISTIC = 1    # same inputs, software and device -> same bits, run after run
    BATCH_INVARIANT = 2  # also: a sequence's bits do not depend on what it is batched with, or how prefill is chunked
    EXACT = 3            # also: the same bits on every conformant backend and every expert-parallel degree

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: "str | Level") -> "Level":
        if isinstance(text, Level):
            return text
        if not isinstance(text, str):
            raise DSV4Error(f"determinism level must be a level name, got {text!r}")
        for level in cls:
            if level.label == text.strip().lower().replace("_", "-"):
                return level
        raise DSV4Error(f"unknown determinism level {text!r}; choose one of: {', '.join(l.label for l in cls)}")


LEVEL_NAMES = [level.label for level in Level]
