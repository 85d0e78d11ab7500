"""What a caller asks the engine for, and what the engine answers with (plain host-side data)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from flaxchat.sampling.detokenizer import compiled_patterns

MAX_TOP_LOGPROBS = 20
ALL_ALLOWED = 0xFFFFFFFF  # one 32-bit word of a next-token bitmask with all of its tokens allowed


def bitmask_words(vocab_size: int) -> int:
    """32-bit words of a next-token bitmask over ``vocab_size`` tokens (bit ``i % 32`` of word ``i // 32``)."""
    return (vocab_size + 31) // 32


@dataclass(frozen=True)
class ThinkingPlan:
    """A reply that starts with a think block: ``open_ids`` are forced first (empty when the prompt already
    opened it), and after ``budget`` thinking tokens (None: no limit) ``close_ids`` are forced; the block ends
    when ``close_text`` appears. A grammar, if any, applies only after the block."""

    open_ids: tuple[int, ...] = ()
    close_ids: tuple[int, ...] = ()
    close_text: str = "</think>"
    budget: int | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; neutral defaults switch each processor off.

    ``temperature`` 0 means greedy. ``seed`` None means the engine draws one and reports it on every event,
    so the request can be replayed.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    stop: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()  # regular expressions no reply may contain: it ends before one, "content_filter"
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    choice_offset: int = 0  # choices are choice_offset .. choice_offset + n - 1 (replay one choice alone)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # score the prompt's tokens, with this many alternatives each (None: off)
    grammar: str | None = None  # llguidance grammar (e.g. from constraints.json_schema_grammar); None = free text
    thinking: ThinkingPlan | None = None  # a think block first (reasoning models), with an optional budget

    def validate(self, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the first setting the engine cannot run. Only the engine's invariants
        live here (finite numbers, the ranges its processors are defined on, token ids in the vocabulary, the
        compiled number of alternatives); an API's own limits (OpenAI's temperature <= 2, penalties within
        +-2, n <= 128, bias within +-100) belong to its request model (``chat/protocol.py``)."""
        numbers = (self.temperature, self.top_p, self.min_p, self.presence_penalty, self.frequency_penalty,
                   self.repetition_penalty, *self.logit_bias.values())
        checks = [
            (all(math.isfinite(float(x)) for x in numbers), "sampling settings must be finite numbers"),
            (self.max_tokens >= (0 if self.prompt_logprobs is not None else 1),
             "max_tokens must be >= 1 (0 only when the prompt is scored)"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.n >= 1, "n must be >= 1"),
            (self.choice_offset >= 0, "choice_offset must be >= 0"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (self.seed is None or 0 <= self.seed < 2**64, "seed must be an unsigned 64-bit integer"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.thinking is None or self.thinking.budget is None or self.thinking.budget >= 0,
             "the thinking budget must be >= 0"),
            (self.thinking is None or self.thinking.budget is None or bool(self.thinking.close_ids),
             "a thinking budget needs the closing tokens to force"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        compiled_patterns(tuple(self.blocked))  # raises ValueError for a bad pattern
        for token in self.logit_bias:
            if not 0 <= int(token) < vocab_size:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        forced = self.thinking.open_ids + self.thinking.close_ids if self.thinking else ()
        for token in tuple(self.stop_token_ids) + forced:
            if not 0 <= int(token) < vocab_size:
                raise ValueError(f"token id {token} (stop or forced token) is outside the vocabulary")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class PromptTokenScore:
    """A prompt token with its log-probability given the tokens before it (None for the first token)."""

    token_id: int
    logprob: float | None
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of one choice: a token (or none, on the final flush), its text delta and, at the end, why it ended.

    ``finish_reason``: None while running, then ``stop`` (EOS/stop token/stop string), ``length``
    (max_tokens or context full), ``cancelled`` or ``error`` (``error`` holds the message).
    """

    choice: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    seed: int | None = None
