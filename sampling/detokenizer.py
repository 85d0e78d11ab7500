"""Streaming text from tokens: an incremental detokenizer and a stop-string filter.

The detokenizer decodes a short window of recent tokens and emits only the new suffix once it no longer
ends in U+FFFD (half of a multi-byte character). Decoding a window rather than single tokens keeps
sentencepiece's leading spaces right: the window's own prefix is decoded the same way and subtracted.
"""

from __future__ import annotations

from flaxchat.model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Concatenating every ``push`` and the final ``flush`` equals ``tokenizer.decode(all ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now complete (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (may contain U+FFFD if the tokens ended mid-character)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]


class StopStringFilter:
    """Hold back text that could be the start of a stop string; cut the output at the first stop string.

    Text is released only when no stop string can begin in it, so a stop string is found even when it is
    split across tokens, and no part of it ever reaches the client.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Feed new text; returns what can be emitted. After a stop string, ``stopped`` is True."""
        if self.stopped or not delta:
            return ""
        if not self.stops:
            return delta
        text = self.pending + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        hold = max(partial_suffix(text, stop) for stop in self.stops)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Release held-back text (the generation ended without completing a stop string)."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``: text to hold back in a
    stream, since the next delta may complete the tag (stop strings, think tags, tool-call triggers)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
