"""Closing a constrained reply before its token budget runs out, so JSON still parses at ``max_tokens``.

Near the end of the budget the engine asks, each step, for a short way to finish the grammar from where the
reply is: the forced tokens llguidance reports, else a closing token (``"`` inside a string; ``}``, ``]``,
``,``, ``0``, ``null``, ``false``, ``"`` outside one), else the shortest allowed token. When that path (plus EOS)
no longer fits in the remaining budget with a small margin, the engine forces it. The reply then ends with
``finish_reason: length`` (the model was cut short) but its JSON is complete and valid.
"""

from __future__ import annotations

import threading

import llguidance
import numpy as np

from flaxchat.model.tokenizer import Tokenizer

WINDOW = 64  # start looking for a way out this many tokens before the end of the budget
MARGIN = 4  # one sampled token can open a few levels at once (e.g. `[{"`)
# "," before "0": inside a number "0" only makes the number longer, and an array short of its minItems
# (or an object short of a required key) needs a comma before anything can close.
_OUTSIDE = ("}", "]", ",", "0", "null", "false", '"')


UNREACHABLE = 10**6  # the length of a token that can never be part of the way out


class VocabFacts:
    """Per-tokenizer facts the closer needs (computed once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        raw = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        special = tokenizer.special_ids
        self.token_bytes = raw
        length = np.array([len(b) if b and i not in special else UNREACHABLE for i, b in enumerate(raw)], np.int64)
        length[[i for i, b in enumerate(raw) if b"\\" in b or b.strip() != b]] = UNREACHABLE  # no escapes or blanks
        self.length = length
        self.quote = self._single(tokenizer, '"')
        self.outside = [t for t in (self._single(tokenizer, s) for s in _OUTSIDE) if t is not None]
        self.eos = tokenizer.special.eos_id
        # Single tokens after which the way out can suddenly get longer (a comma forces the next key).
        self.openers = [t for t in (self._single(tokenizer, s) for s in (",", "{", "[", '"', ":")) if t is not None]

    @staticmethod
    def _single(tokenizer: Tokenizer, text: str) -> int | None:
        ids = tokenizer.encode(text)
        return ids[0] if len(ids) == 1 else None


_LOCK = threading.Lock()


def vocab_facts(tokenizer: Tokenizer, vocab_size: int) -> VocabFacts:
    with _LOCK:
        return tokenizer.derived(("vocab facts", vocab_size), lambda: VocabFacts(tokenizer, vocab_size))


class StringTracker:
    """Whether the text so far ends inside a JSON string (quotes and backslash escapes)."""

    def __init__(self) -> None:
        self.inside = False
        self._escape = False

    def push(self, data: bytes) -> None:
        for byte in data:
            if self._escape:
                self._escape = False
            elif self.inside and byte == 0x5C:
                self._escape = True
            elif byte == 0x22:
                self.inside = not self.inside

    def copy(self) -> "StringTracker":
        other = StringTracker()
        other.inside, other._escape = self.inside, self._escape
        return other


class BudgetCloser:
    """One choice's watch over its budget: decides, each step near the end, whether to force the way out.

    Forcing starts when the way out (plus a margin) no longer fits after the worst structural token the model
    might sample next. Outside strings that is checked directly (a comma can force a whole key); inside a
    string the characters are plain text, so the jump seen outside (or, once, after closing the string) is
    reused instead of checking every step.
    """

    def __init__(self, facts: VocabFacts):
        self.facts = facts
        self.strings = StringTracker()
        self.jump: int | None = None  # largest growth of the way out one structural token caused

    def push(self, token: int) -> None:
        self.strings.push(self.facts.token_bytes[token])

    def path_to_force(self, matcher: llguidance.LLMatcher, remaining: int) -> list[int] | None:
        if remaining > WINDOW or matcher.is_accepting():
            return None
        path = closing_path(matcher, self.strings, self.facts, limit=remaining)
        if path is None:
            return None  # no way out fits any more: the reply will end incomplete (finish_reason length)
        need = len(path)
        if need + MARGIN >= remaining:
            return path
        if self.strings.inside and self.jump is not None:
            return path if need + self.jump + 1 + MARGIN >= remaining else None
        worst = self._worst_next(matcher, remaining)
        if worst is None:
            return path
        self.jump = max(self.jump or 0, worst - need)
        return path if worst + MARGIN >= remaining else None

    def _worst_next(self, matcher: llguidance.LLMatcher, remaining: int) -> int | None:
        """The longest way out after one structural token (after the closing quote, inside a string)."""
        facts, worst = self.facts, 0
        firsts: list[list[int]] = []
        allowed = _allowed(matcher, len(facts.token_bytes))
        if self.strings.inside:
            if facts.quote is not None and allowed[facts.quote]:
                firsts = [[facts.quote]] + [[facts.quote, t] for t in facts.openers if t != facts.quote]
        else:
            firsts = [[t] for t in facts.openers if allowed[t]]
        for first in firsts:
            after = closing_path(matcher, self.strings, facts, limit=remaining, first=first)
            if after is None:
                if len(first) == 1:
                    return None
                continue  # the opener is not allowed after the quote
            worst = max(worst, len(after) - (len(first) - 1))
        return worst


def _allowed(matcher: llguidance.LLMatcher, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)


def closing_path(matcher: llguidance.LLMatcher, strings: StringTracker, facts: VocabFacts,
                 limit: int, first: list[int] | tuple[int, ...] = ()) -> list[int] | None:
    """Tokens that finish the grammar from ``matcher``'s state (after ``first``, which the path then starts
    with), ending with EOS unless the grammar stops by itself; None if no path of at most ``limit`` tokens
    was found. The matcher is not changed."""
    if first and matcher.validate_tokens(list(first)) < len(first):
        return None  # checked first: a refused token would make llguidance log a warning
    m, strings, path = matcher.deep_copy(), strings.copy(), []
    vocab = len(facts.token_bytes)
    for token in first:
        if not m.consume_token(token):
            return None
        strings.push(facts.token_bytes[token])
        path.append(token)
    while not m.is_stopped():
        if len(path) >= limit:
            return None
        if m.is_accepting():
            if facts.eos is None:
                return None
            path.append(facts.eos)
            return path
        forced = m.compute_ff_tokens()
        if not forced:
            allowed = _allowed(m, vocab)
            preferred = [facts.quote] if strings.inside else facts.outside
            choice = next((t for t in preferred if t is not None and allowed[t]), None)
            if choice is None:
                lengths = np.where(allowed, facts.length, UNREACHABLE)
                choice = int(np.argmin(lengths))
                if lengths[choice] >= UNREACHABLE:
                    return None
            forced = [choice]
        for token in forced:
            if not m.consume_token(token):
                return None
            strings.push(facts.token_bytes[token])
            path.append(token)
    return path
