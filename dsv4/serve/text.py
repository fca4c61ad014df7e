"""A request's output text as its tokens arrive: whole characters only, cut at the first stop string, and nothing
sent that a stop string might still swallow."""
from __future__ import annotations

from dsv4.tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1   # a stop string may still be forming in these
        self.text = ""          # everything decoded so far (up to the stop string, once one is found)
        self.sent = 0           # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text that is safe to send after `token`."""
        self._add(self._decoder.push(token))
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """Whatever text is left at the end of the request."""
        if not self.stopped:
            self._add(self._decoder.finish())
        return self._take(final=True)

    def _add(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        searched = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, searched) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self.sent, len(self.text) - self._hold)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece
