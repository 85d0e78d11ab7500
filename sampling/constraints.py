"""Grammar-constrained decoding with llguidance: one matcher per choice, a token bitmask per step.

The matcher turns a grammar (JSON schema, Lark, regex; llguidance's JSON grammar format) into the set of
tokens allowed next; the engine passes that set to the jitted step as a ``[ceil(V/32)]`` uint32 bitmask and
advances the matcher with every sampled token. EOS is allowed only where the grammar accepts, so a
constrained reply is valid by construction or ends with ``finish_reason='length'``.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import numpy as np

from model.tokenizer import HFTokenizer, Tokenizer


class ConstraintError(ValueError):
    """The grammar is invalid or cannot be used with this tokenizer (the server answers 400)."""


_TOKENIZERS: dict[int, llguidance.LLTokenizer] = {}
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer (built once per tokenizer: it costs about a second)."""
    with _LOCK:
        cached = _TOKENIZERS.get(id(tokenizer))
        if cached is None:
            if not isinstance(tokenizer, HFTokenizer):
                raise ConstraintError("constrained decoding needs a tokenizer.json tokenizer (sentencepiece is not wired yet)")
            cached = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                            eos_token=tokenizer.special.eos_id)
            _TOKENIZERS[id(tokenizer)] = cached
        return cached


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """Grammar for JSON matching ``schema``, written compactly (``{"a": 1, "b": [2, 3]}``): flexible
    whitespace would let a model spend its whole budget on blanks inside the JSON."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


class TokenConstraint:
    """One choice's matcher."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, words: int):
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ConstraintError(f"invalid grammar: {error}")
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"invalid grammar: {self.matcher.get_error()}")
        self.words = words

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


def describe(grammar: str) -> str:
    """A short description for logs."""
    try:
        return json.dumps(json.loads(grammar))[:80]
    except ValueError:
        return grammar[:80]
