"""Token ids to text as they arrive, with OpenAI's stop-sequence rule.

:class:`TextStream` decodes the whole answer each time tokens arrive and hands out what is new.
It holds back what could still turn into a stop sequence (or an unfinished UTF-8 character), and
once a stop sequence appears, the text ends just before it (OpenAI does not return the stop text).
"""

from __future__ import annotations


class TextStream:
    """Incremental detokenizer for one answer; ``skip_special_tokens`` drops EOS and friends."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out so far
        self.stopped = False  # a stop sequence was found

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, new: list[int]) -> str:
        """Add ``new`` token ids; returns the text that is now certain."""
        if self.stopped:
            return ""
        self.tokens += new
        text = self._text()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._take(text, cut)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":  # an unfinished multi-byte character
            end -= 1
        return self._take(text, end)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        text = self._text()
        cut = self._stop_at(text)
        self.stopped = cut is not None
        return self._take(text, len(text) if cut is None else cut)

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out
