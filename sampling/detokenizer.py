"""Streaming text from tokens: an incremental detokenizer and a stop-string filter.

The detokenizer decodes a short window of recent tokens and emits only the new suffix once it no longer
ends in U+FFFD (half of a multi-byte character). Decoding a window rather than single tokens keeps
sentencepiece's leading spaces right: the window's own prefix is decoded the same way and subtracted.
"""

from __future__ import annotations

import functools

import regex

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
    """Hold back text that could be the start of a stop string or of blocked text; cut the output at the first
    stop string (``reason`` "stop") or before the first match of a blocked pattern ("content_filter").

    Text is released only when no stop string and no blocked match can begin in it, so either is found even
    when split across tokens, and no part of it ever reaches the client. Blocked patterns are regular
    expressions (the ``regex`` module, whose partial matches say where a match may still begin).
    """

    def __init__(self, stops: tuple[str, ...], blocked: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.blocked = compiled_patterns(blocked)
        self.pending = ""
        self.stopped = False
        self.reason: str | None = None  # "stop" or "content_filter" once stopped

    def push(self, delta: str) -> str:
        """Feed new text; returns what can be emitted. After a stop string or blocked text, ``stopped`` is True."""
        if self.stopped or not delta:
            return ""
        if not self.stops and not self.blocked:
            return delta
        text = self.pending + delta
        ends = [(i, 1, "stop") for i in (text.find(s) for s in self.stops) if i >= 0]
        open_from = len(text) - max((partial_suffix(text, s) for s in self.stops), default=0)
        for pattern in self.blocked:
            match = pattern.search(text, partial=True)
            if match is None:
                continue
            if match.partial:
                open_from = min(open_from, match.start())
            else:
                ends.append((match.start(), 0, "content_filter"))  # a tie with a stop string: blocked wins
        if ends:  # several can complete in one delta: the earliest-starting one cuts
            start, _, reason = min(ends)
            self.stopped, self.reason, self.pending = True, reason, ""
            return text[:start]
        self.pending = text[open_from:]
        return text[:open_from]

    def flush(self) -> str:
        """Release held-back text (the generation ended without completing a stop string or a match)."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text


@functools.lru_cache(maxsize=64)
def compiled_patterns(sources: tuple[str, ...]) -> tuple[regex.Pattern, ...]:
    """Blocked-text patterns compiled once per distinct set; raises ``ValueError`` for a bad one."""
    try:
        return tuple(regex.compile(source) for source in sources)
    except regex.error as exc:
        raise ValueError(f"bad content filter pattern: {exc}") from None


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``: text to hold back in a
    stream, since the next delta may complete the tag (stop strings, think tags, tool-call triggers)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
