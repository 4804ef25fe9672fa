"""Token ids -> text on rank 0: incremental detokenization, stop strings and the strings of logprob entries.

Streaming and non-streaming answers are built from the same deltas, so the chunks of a stream concatenate to
exactly the text of the same request without streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Detokenizer:
    """Text deltas of a growing id sequence, O(1) decodes per token (TGI's prefix/read offsets).

    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text: decoding from a recent offset keeps
    each step short, and both decodes start at the same token, so a sentencepiece leading space that one strips the
    other strips too. A delta ending in U+FFFD (an incomplete UTF-8 byte sequence) is held back until the rest comes.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back (an incomplete character at the very end stays U+FFFD, as a full decode shows it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def piece(self, token: int) -> str:
        """The text ``token`` would add after the ids so far (the strings of logprob entries and alternatives)."""
        base = self.ids[self.prefix :]
        before = self.decode(base)
        after = self.decode([*base, token])
        return after[len(before) :] if after.startswith(before) else self.decode([token])


class StopText:
    """Releases text as it becomes final: holds back a tail that could begin a stop string, cuts at the first one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Append ``delta``; return the newly final text (``stopped`` is set when a stop string appeared)."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        hits = [i for i in (self.text.find(s, max(self.sent - len(s) + 1, 0)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(max(min(hits), self.sent))
        hold = 0
        for s in self.stops:  # longest tail of the text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def utf8_bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", errors="replace"))
