"""One choice's host-side state while it holds a slot, and what each sampled token does to it.

The engine thread owns every ``Choice``: it feeds sampled tokens in (``accept``) and pushes the returned
``TokenEvent`` to the request's handle. A token goes through three steps: the grammar or thinking guide
advances, the text is detokenized through the stop-string filter, and the finish reason is decided (stop
token, stop string, guide done, budget; held-back text is flushed when the choice ends).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import jax

from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.closing import vocab_facts
from flaxchat.sampling.constraints import ChoiceGuide, TokenConstraint, ll_tokenizer
from flaxchat.sampling.detokenizer import IncrementalDetokenizer, StopStringFilter
from flaxchat.sampling.params import ALL_ALLOWED, SamplingParams, TokenEvent, TokenLogprob, bitmask_words
from flaxchat.sampling.requests import RequestHandle
from flaxchat.sampling.sampler import RowRequest, choice_key, make_row_request


@dataclass
class Choice:
    handle: RequestHandle
    index: int
    budget: int  # tokens this choice may still generate (max_tokens and context)
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    want_logprobs: bool
    top_logprobs: int
    guide: ChoiceGuide | None = None
    sequence: list[int] = field(default_factory=list)  # the prompt and the tokens sampled so far
    generated: int = 0
    finished: bool = False

    def accept(self, token: int, logprob: Any, top_ids: Any, top_lps: Any) -> TokenEvent:
        """The event for this choice's next sampled token (``finished`` is set when it ends the choice)."""
        self.generated += 1
        self.sequence.append(token)
        if self.guide is not None:
            try:
                self.guide.advance(token)
            except ValueError as exc:  # cannot happen with a correct mask; never return ungrammatical text
                return self.end("error", str(exc), token)
        text = "" if token in self.stop_ids else self.stops.push(self.detok.push(token))
        finish = self._finish_reason(token)
        if finish == "length" or (finish == "stop" and not self.stops.stopped):
            text += self.stops.push(self.detok.flush()) + self.stops.flush()  # the text held back so far
        tops: tuple[TokenLogprob, ...] = ()
        if self.want_logprobs and self.top_logprobs:
            tops = tuple(TokenLogprob(int(i), float(lp)) for i, lp in zip(top_ids[: self.top_logprobs],
                                                                           top_lps[: self.top_logprobs]))
        return self._event(token, text, float(logprob) if self.want_logprobs else None, tops, finish)

    def end(self, reason: str, error: str | None = None, token: int | None = None) -> TokenEvent:
        """The event that ends this choice without text (cancelled, error)."""
        return self._event(token, "", None, (), reason, error)

    def next_mask(self, words: int) -> np.ndarray | None:
        """The bitmask to upload before the next step: the guide's, all-ones when its restriction just
        ended, None when nothing changes."""
        if self.guide is None:
            return None
        mask = self.guide.mask(self.budget - self.generated)
        was_masked, self.guide.masked = self.guide.masked, mask is not None
        if mask is None and was_masked:
            return np.full(words, ALL_ALLOWED, np.uint32)
        return mask

    @property
    def closed_by_budget(self) -> bool:
        return self.guide is not None and self.guide.closed_by_budget

    def _finish_reason(self, token: int) -> str | None:
        if self.stops.reason == "content_filter":
            return "content_filter"
        if token in self.stop_ids or self.stops.stopped or (self.guide is not None and self.guide.done):
            # complete; "length" when only because the guide forced its end to fit max_tokens
            return "length" if self.closed_by_budget else "stop"
        return "length" if self.generated >= self.budget else None

    def _event(self, token: int | None, text: str, logprob: float | None, tops: tuple[TokenLogprob, ...],
               finish: str | None, error: str | None = None) -> TokenEvent:
        if finish is not None:
            self.finished = True
        return TokenEvent(self.index, token, text, logprob, tops, finish, error, self.handle.seed)


class ChoiceMaker:
    """Builds what a request's choices start with, for one tokenizer and context length: grammars, the
    device row settings, and each ``Choice``."""

    GRAMMARS_KEPT = 64  # compiled grammars kept for reuse (an agent sends the same tools every turn)

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_len: int):
        self.tokenizer, self.vocab_size, self.max_len = tokenizer, vocab_size, max_len
        self.words = bitmask_words(vocab_size)
        self._compiled: collections.OrderedDict[str, TokenConstraint] = collections.OrderedDict()
        self._lock = threading.Lock()  # submit() runs on callers' threads, choices start on the engine's

    def prepare(self) -> None:
        """Build the tokenizer's grammar views (about a second) and compile the small jax ops a choice's
        start runs on the host (its key), so the first request after start is not the slow one."""
        ll_tokenizer(self.tokenizer, self.vocab_size)
        vocab_facts(self.tokenizer, self.vocab_size)
        jax.block_until_ready(choice_key(0, 0))

    def constraint(self, grammar: str) -> TokenConstraint:
        """A fresh matcher for ``grammar`` (a copy of the compiled one); raises ``ConstraintError``."""
        return self.compiled(grammar).copy()

    def compiled(self, grammar: str) -> TokenConstraint:
        """``grammar`` compiled once, kept for reuse (never advanced: choices take copies); raises
        ``ConstraintError`` naming the problem, so validating a request compiles what its choices will use."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = TokenConstraint(ll_tokenizer(self.tokenizer, self.vocab_size), grammar, self.words)
                self._compiled[grammar] = compiled
                if len(self._compiled) > self.GRAMMARS_KEPT:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(grammar)
            return compiled

    def row(self, params: SamplingParams, prompt: list[int]) -> RowRequest:
        """The device settings every choice of the request shares."""
        return make_row_request(
            self.vocab_size, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=params.min_p, presence=params.presence_penalty, frequency=params.frequency_penalty,
            repetition=params.repetition_penalty, logit_bias=dict(params.logit_bias), prompt=prompt,
            top_logprobs=params.top_logprobs if params.logprobs else 0,
        )

    def choice(self, handle: RequestHandle, params: SamplingParams, prompt: list[int], index: int,
               row: RowRequest) -> tuple[Choice, RowRequest]:
        """Choice ``index`` of a request and its row settings (with its first-token mask when guided)."""
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.tokenizer.stop_ids)
        budget = min(params.max_tokens, self.max_len - len(prompt))
        guide = None
        if params.grammar is not None or params.thinking is not None:
            constraint = self.constraint(params.grammar) if params.grammar is not None else None
            facts = vocab_facts(self.tokenizer, self.vocab_size) if constraint is not None else None
            guide = ChoiceGuide(constraint, params.thinking, self.tokenizer.token_bytes, self.words, stop_ids, facts)
            mask = guide.mask(budget)
            guide.masked = mask is not None
            if mask is not None:
                row = row.replace(allowed=np.asarray(mask, np.uint32))
        choice = Choice(handle, index, budget, stop_ids, IncrementalDetokenizer(self.tokenizer),
                        StopStringFilter(params.stop, params.blocked), params.logprobs, params.top_logprobs, guide,
                        list(prompt))
        return choice, row
