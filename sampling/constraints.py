"""Grammar-constrained decoding with llguidance: one matcher per choice, a token bitmask per step.

The matcher turns a grammar (JSON schema, Lark, regex; llguidance's JSON grammar format) into the set of
tokens allowed next; the engine passes that set to the jitted step as a ``[ceil(V/32)]`` uint32 bitmask and
advances the matcher with every sampled token. EOS is allowed only where the grammar accepts, so a
constrained reply is valid by construction; near the end of its token budget ``sampling.closing`` forces
the shortest way out, so it stays valid when cut short (``finish_reason='length'``).
``ChoiceGuide`` puts a reasoning model's think block (forced open/close, budget) in front of the grammar.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import llguidance
from llguidance import TokenizerWrapper
import numpy as np

from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.closing import BudgetCloser, VocabFacts
from flaxchat.sampling.params import ALL_ALLOWED

if TYPE_CHECKING:
    from flaxchat.sampling.params import ThinkingPlan


class ConstraintError(ValueError):
    """The grammar is invalid or cannot be used with this tokenizer (the server answers 400)."""


_LOCK = threading.Lock()


class _TokenSource:
    """What llguidance needs to know about a tokenizer: each token's bytes, which ids are special (control)
    tokens, and how text tokenizes. Built from our own Tokenizer, so byte-level BPE and sentencepiece work
    alike, and added tokens that are not special (Qwen's ``<think>``, ``<tool_call>``) are ordinary text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        # Weakly: llguidance's view is kept on the tokenizer (Tokenizer.derived), and a strong reference back
        # through llguidance's native object would be a cycle Python's collector cannot see.
        self._tokenizer = weakref.ref(tokenizer)
        self.eos_token_id = tokenizer.special.eos_id
        self.bos_token_id = tokenizer.special.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer().encode(text)


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer (built once per tokenizer and kept on it: it costs about a second)."""
    with _LOCK:
        return tokenizer.derived(("llguidance", vocab_size),
                                 lambda: llguidance.LLTokenizer(TokenizerWrapper(_TokenSource(tokenizer, vocab_size))))


LARGEST_INTEGER = 2**53 - 1  # integers a JSON reader keeps exactly (16 digits), as llama.cpp's grammars hold them
LARGEST_NUMBER = 1e15  # the magnitude of an unbounded "number"


def bounded_numbers(schema: Any) -> Any:
    """``schema`` with every integer or number that has no bound on a side bounded there (``LARGEST_INTEGER``,
    ``LARGEST_NUMBER``), so a weak model cannot write a 300-digit integer until its budget runs out. (The
    grammar still allows any number of fraction digits; the budget closer ends those.)"""
    if isinstance(schema, list):
        return [bounded_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bounded_numbers(value) for key, value in schema.items()}
    types = schema.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if types & {"integer", "number"} and "const" not in schema and "enum" not in schema:
        limit = LARGEST_INTEGER if types & {"integer"} else LARGEST_NUMBER
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            bounded["minimum"] = -limit
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            bounded["maximum"] = limit
    return bounded


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """Grammar for JSON matching ``schema`` (numbers bounded: ``bounded_numbers``), written compactly
    (``{"a": 1, "b": [2, 3]}``): flexible whitespace would let a model spend its whole budget on blanks."""
    return llguidance.LLMatcher.grammar_from_json_schema(bounded_numbers(schema), defaults={"whitespace_flexible": False})


def _readable(error: str) -> str:
    """llguidance's message without a backtrace; a panic inside its compiler (seen: the symbol table's limit,
    with 128 tools of 50 properties) is reported as the limit it is."""
    first = error.split("<backtrace>")[0].strip()
    if first.startswith("panic:"):
        return f"the grammar is too large to compile ({first.removeprefix('panic:').strip()})"
    return first


class TokenConstraint:
    """One choice's matcher."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, words: int):
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ConstraintError(f"invalid grammar: {_readable(error)}")
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"invalid grammar: {_readable(self.matcher.get_error())}")
        self.words = words

    def copy(self) -> "TokenConstraint":
        """A matcher in this one's state, without compiling the grammar again."""
        twin = object.__new__(TokenConstraint)
        twin.matcher, twin.words = self.matcher.deep_copy(), self.words
        return twin

    def allowed(self) -> np.ndarray:
        """Bitmask of the tokens allowed next (bit ``i % 32`` of word ``i // 32``)."""
        mask = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)[: self.words]
        if mask.shape[0] < self.words:
            mask = np.concatenate([mask, np.zeros(self.words - mask.shape[0], np.uint32)])
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} violates the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.matcher.is_stopped()


def token_mask(token: int, words: int) -> np.ndarray:
    """Bitmask allowing exactly one token (forced tokens)."""
    mask = np.zeros(words, np.uint32)
    mask[token // 32] = np.uint32(1) << np.uint32(token % 32)
    return mask


class ChoiceGuide:
    """What one choice may sample next: an optional thinking phase, then an optional grammar.

    Thinking (``ThinkingPlan``): the opening tokens are forced, the model thinks freely until it writes the
    closing tag or spends ``budget`` tokens, in which case the closing tokens are forced. Only then does the
    grammar (JSON schema, tool calls) start: reasoning is free text, the answer is constrained.
    ``mask()`` is None when every token is allowed (no upload needed).
    """

    def __init__(self, constraint: TokenConstraint | None, thinking: "ThinkingPlan | None",
                 token_bytes: "Callable[[int], bytes]", words: int, stop_ids: frozenset[int] = frozenset(),
                 facts: "VocabFacts | None" = None):
        self.constraint, self.thinking, self.token_bytes, self.words = constraint, thinking, token_bytes, words
        self.closer = BudgetCloser(facts) if facts is not None else None  # close before the budget runs out
        self.closed_by_budget = False  # the end of the reply was forced to fit the budget
        # A grammar still to come means the reply may not end inside the think block.
        self._thinking_mask = None
        if constraint is not None and thinking is not None and stop_ids:
            self._thinking_mask = np.full(words, ALL_ALLOWED, np.uint32)
            for token in stop_ids:
                self._thinking_mask[token // 32] &= ~(np.uint32(1) << np.uint32(token % 32))
        self._forced: list[int] = list(thinking.open_ids) if thinking else []
        self.phase = "thinking" if thinking is not None else "answer"  # thinking -> closing -> answer
        self._spent = 0
        self._tail = b""
        self.masked = False  # the device holds a restrictive mask for this row (reset it when free again)
        self._check_budget()

    def mask(self, remaining: int | None = None) -> np.ndarray | None:
        """Allowed next tokens; ``remaining`` is how many tokens the reply may still take."""
        if self._forced:
            return token_mask(self._forced[0], self.words)
        if self.phase == "answer" and self.constraint is not None:
            if remaining is not None and self._plan_closing(remaining):
                return token_mask(self._forced[0], self.words)
            return self.constraint.allowed()
        return self._thinking_mask if self.phase != "answer" else None

    def _plan_closing(self, remaining: int) -> bool:
        if self.closer is None:
            return False
        path = self.closer.path_to_force(self.constraint.matcher, remaining)
        if path is None:
            return False
        self._forced, self.closed_by_budget = path, True
        return True

    def advance(self, token: int) -> None:
        if self._forced:
            self._forced.pop(0)
            if self.phase == "answer" and self.constraint is not None:
                self._advance_answer(token)
            elif not self._forced and self.phase == "closing":
                self.phase = "answer"
            return
        if self.phase == "thinking":
            self._spent += 1
            self._tail = (self._tail + self.token_bytes(token))[-64:]
            if self.thinking.close_text.encode() in self._tail:
                self.phase = "answer"
            else:
                self._check_budget()
            return
        if self.constraint is not None:
            self._advance_answer(token)

    def _advance_answer(self, token: int) -> None:
        self.constraint.advance(token)
        if self.closer is not None:
            self.closer.push(token)

    def _check_budget(self) -> None:
        if self.phase == "thinking" and self.thinking.budget is not None and self._spent >= self.thinking.budget:
            self.phase = "closing"
            self._forced += list(self.thinking.close_ids)

    @property
    def done(self) -> bool:
        """The answer's grammar is complete and allows nothing more."""
        return self.phase == "answer" and self.constraint is not None and self.constraint.done

