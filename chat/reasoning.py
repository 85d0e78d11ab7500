"""Reasoning models: ``reasoning_effort`` -> template switch and thinking budget; split the reply into
``reasoning_content`` and ``content``.

Models that think in ``<think>...</think>`` (Qwen3, DeepSeek-R1 distills) are recognised from their chat
template. ``minimal`` (and ``none``) turn thinking off through the template's ``enable_thinking`` switch;
``low``/``medium``/``high`` turn it on with a budget of 512/2048/8192 thinking tokens (at most half of the
reply's token budget, so an answer always has room); when the budget is spent the engine forces
``</think>``. Without ``reasoning_effort`` the template's default applies and thinking is not limited,
except that a constrained reply (JSON, tool calls) keeps half of ``max_tokens`` for its answer. For models
without thinking, ``reasoning_effort`` is accepted and has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass

from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.detokenizer import partial_suffix
from flaxchat.sampling.params import ThinkingPlan

EFFORTS = ("none", "minimal", "low", "medium", "high")
THINKING_BUDGETS = {"low": 512, "medium": 2048, "high": 8192}
OPEN_TAG, CLOSE_TAG = "<think>", "</think>"
SWITCH = "enable_thinking"  # the template variable that turns thinking on and off


def template_thinks(template: str) -> bool:
    """Does this chat template belong to a model that reasons in think tags?"""
    return OPEN_TAG in template or SWITCH in template


def template_switch(has_switch: bool, effort: str | None) -> dict[str, bool]:
    """Extra template variables for ``effort`` (Qwen3's ``enable_thinking``) in a template that has the switch."""
    if effort is None or not has_switch:
        return {}
    return {SWITCH: effort not in ("none", "minimal")}


@dataclass(frozen=True)
class ReasoningSetup:
    """How a reply of a reasoning model is decoded and split."""

    plan: ThinkingPlan | None  # engine side: forced open tag, budget, forced close
    open_at_start: bool  # the prompt already opened the think block


def reasoning_setup(thinks: bool, prompt_text: str, tokenizer: Tokenizer, effort: str | None, max_tokens: int,
                    constrained: bool) -> ReasoningSetup | None:
    """None for models that do not think (``thinks``: ``template_thinks``) or when thinking is switched off."""
    if not thinks or effort in ("none", "minimal"):
        return None
    tail = prompt_text.rstrip()
    if tail.endswith(CLOSE_TAG):  # the template closed an empty block: thinking is off
        return None
    open_in_prompt = tail.endswith(OPEN_TAG)
    budget = None if effort is None else min(THINKING_BUDGETS[effort], max_tokens // 2)
    if budget is None and constrained:  # the constrained answer must still have room after the thinking
        budget = max_tokens // 2
    plan = None
    if budget is not None or constrained:  # a budget to enforce, or a grammar that must wait for the answer
        plan = ThinkingPlan(
            open_ids=() if open_in_prompt else tuple(tokenizer.encode(OPEN_TAG + "\n")),
            close_ids=tuple(tokenizer.encode("\n" + CLOSE_TAG + "\n\n")),
            close_text=CLOSE_TAG,
            budget=budget,
        )
    return ReasoningSetup(plan, open_in_prompt)


class ReasoningSplitter:
    """Splits streamed text into (reasoning, content) deltas; tags may be split across deltas anywhere.

    A think block is recognised only at the start of the reply (after blanks), or from the first token when
    the prompt opened it. Blanks right after ``<think>``, right before ``</think>`` and right after it are
    dropped, so a reply reads ``reasoning_content="...", content="..."`` without stray newlines. The
    non-streamed reply runs the same splitter over the whole text, so both always agree.
    """

    def __init__(self, open_at_start: bool):
        self.state = "reasoning" if open_at_start else "start"
        self._buffer = ""
        self._lead = True  # dropping blanks at the start of the current part

    def push(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(OPEN_TAG):
                    self._buffer, self.state, self._lead = stripped[len(OPEN_TAG):], "reasoning", True
                    continue
                if OPEN_TAG.startswith(stripped):  # maybe the tag is still coming
                    return reasoning, content
                self.state, self._lead = "content", False
                continue
            if self.state == "reasoning":
                if self._lead:
                    self._buffer = self._buffer.lstrip()
                    if not self._buffer:
                        return reasoning, content
                    self._lead = False
                at = self._buffer.find(CLOSE_TAG)
                if at >= 0:
                    reasoning += self._buffer[:at].rstrip()
                    self._buffer, self.state, self._lead = self._buffer[at + len(CLOSE_TAG):], "content", True
                    continue
                keep = partial_suffix(self._buffer, CLOSE_TAG)
                body = self._buffer[: len(self._buffer) - keep]
                held = len(body) - len(body.rstrip())  # blanks may turn out to precede </think>
                reasoning += body[: len(body) - held]
                self._buffer = self._buffer[len(body) - held:]
                return reasoning, content
            if self._lead:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return reasoning, content
                self._lead = False
            content += self._buffer
            self._buffer = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The end of the reply: whatever is held back is final."""
        rest, self._buffer = self._buffer, ""
        if self.state == "reasoning":
            return rest.rstrip(), ""
        if self.state == "start":
            self.state = "content"
        return "", rest if not self._lead else rest.lstrip()
