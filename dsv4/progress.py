"""Progress on stderr for the command line: a bar per phase on a terminal (tqdm), plain lines otherwise, nothing when
disabled (`--quiet`).

Producers report `(phase, done, total)`: the checkpoint loader ("load", tensors), the engine ("prefill" per prompt,
"decode" over all requests), the conformance suite ("verify ops", "verify models") and the evaluation ("eval",
segments). A phase that starts again (the next prompt's prefill) gets a fresh bar. When stderr is not a terminal a
phase prints one line when it starts and one when it ends, so logs stay short.
"""
from __future__ import annotations

import sys
from typing import TextIO

UNITS = {"load": "tensor", "prefill": "tok", "decode": "tok", "verify ops": "case", "verify models": "preset",
         "eval": "segment"}


class Progress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None, tty: bool | None = None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.hidden: set[str] = set()    # phases not shown (e.g. decode while the text itself streams to the terminal)
        self.phase: str | None = None
        self.done = self.total = 0
        self.printed = -1                # the count of the current phase's last line (no terminal)
        self.bar = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled or phase in self.hidden:
            return
        if phase != self.phase or total != self.total or done < self.done:
            self.close()
            self.phase, self.total = phase, total
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=phase, unit=UNITS.get(phase, "it"), file=self.stream, leave=False,
                                dynamic_ncols=True)
            else:
                self._line(done)
        self.done = done
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def loading(self, done: int, total: int) -> None:
        """The checkpoint loader's callback."""
        self("load", done, total)

    def close(self) -> None:
        """End the current phase: its bar is removed from the terminal, or its last count printed as a line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.phase is not None and self.printed != self.done:
            self._line(self.done)
        self.phase = None
        self.done = self.total = 0

    def _line(self, done: int) -> None:
        self.printed = done
        print(f"{self.phase}: {done}/{self.total}", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
