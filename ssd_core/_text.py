"""Text for a request: incremental detokenisation and stop strings.

Stop strings are matched on the decoded text, across token boundaries. The text
streamed so far never includes a character that a later token could still change:
a trailing incomplete UTF-8 character (decoded as U+FFFD) and, while stop strings are
set, the tail that could still become the start of one are held back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextTracker"]


class TextTracker:
    """Follows one request's generated tokens as text.

    Args:
        tokenizer: the target's :class:`~ssd_core.Tokenizer`.
        stops: text stop strings (may be empty).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.shown = 0
        #: Set once a stop string matched: (tokens to keep, text length to keep, stop).
        self.stopped: tuple[int, int, str] | None = None

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens)))

    def add(self, tokens: Sequence[int]) -> str:
        """Take newly committed tokens; returns the new stable text. After a stop string
        matches, :attr:`stopped` says how much to keep and nothing more is taken."""
        if self.stopped is not None:
            return ""
        before = len(self.text)
        self.tokens.extend(tokens)
        self.text = self._decode(self.tokens)
        if self.stops:
            # A match can only involve text from (before - longest stop) on.
            start = max(0, min(before, len(self.text)) - self._hold)
            hits = [(self.text.find(s, start), s) for s in self.stops]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, stop = min(hits)
                self.stopped = (self._tokens_through(at + len(stop), len(tokens)), at, stop)
                self.text = self.text[:at]
                return self._flush(len(self.text))
        stable = len(self.text.rstrip("\ufffd"))
        if self.stops:
            stable = min(stable, len(self.text) - self._hold)
        return self._flush(stable)

    def finish(self) -> str:
        """The rest of the text once the request has ended."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        out = self.text[self.shown : upto]
        self.shown = upto
        return out

    def _tokens_through(self, end: int, new: int) -> int:
        """The fewest tokens whose text reaches ``end`` characters (only the last
        ``new`` tokens can be the one that completed the match)."""
        lo = len(self.tokens) - new
        for n in range(max(lo, 1), len(self.tokens) + 1):
            if len(self._decode(self.tokens[:n])) >= end:
                return n
        return len(self.tokens)
