"""``ChatFormat``: one model's chat conventions, worked out once from its template and tokenizer.

Which tool-call syntax the template teaches (``chat/tools.py``), whether the model thinks in ``<think>``
tags and whether the template has the ``enable_thinking`` switch (``chat/reasoning.py``), and the special
tokens the template may print. Every request of the model goes through the same object: messages ->
prompt text (``render``), tools / JSON -> a grammar (``tool_grammar``), reasoning settings -> a thinking
plan (``reasoning``), reply text -> message parts (``reply_text``, ``message``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flaxchat.chat.errors import ChatError
from flaxchat.chat.reasoning import SWITCH, ReasoningSetup, ReasoningSplitter, reasoning_setup, template_switch, template_thinks
from flaxchat.chat.reply_text import ChoiceText, assemble_message, new_call_id
from flaxchat.chat.template import ChatTemplateError, compile_template, render_chat
from flaxchat.chat.tool_parsers import ToolCallStream
from flaxchat.chat.tools import (ToolChoice, ToolSpec, check_conversation, detect_syntax, template_messages, tool_grammar,
                                 with_generic_tools)
from flaxchat.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolSetup:
    """A request's tools as the model sees them."""

    specs: tuple[ToolSpec, ...]
    choice: ToolChoice
    parallel: bool

    @property
    def active(self) -> bool:
        return self.choice.mode != "none"


@dataclass(frozen=True)
class ChatFormat:
    template: str
    tokenizer: Tokenizer
    tool_syntax: str = field(init=False)  # hermes | mistral | llama3 | generic (chat/tools.py)
    thinks: bool = field(init=False)  # reasons in think tags
    has_thinking_switch: bool = field(init=False)  # the template reads enable_thinking

    def __post_init__(self) -> None:
        compile_template(self.template)  # a broken template fails at load, not on the first request
        object.__setattr__(self, "tool_syntax", detect_syntax(self.template))
        object.__setattr__(self, "thinks", template_thinks(self.template))
        object.__setattr__(self, "has_thinking_switch", SWITCH in self.template)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        special = self.tokenizer.special
        return {"bos_token": special.bos_token, "eos_token": special.eos_token}

    def render(self, messages: list[dict[str, Any]], tools: ToolSetup | None = None, effort: str | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text for OpenAI-shaped ``messages`` (and ``tools`` when the reply may call them)."""
        check_conversation(messages)
        messages = template_messages(messages, self.tool_syntax)
        shown = None
        if tools is not None and tools.active and self.tool_syntax == "generic":
            messages = with_generic_tools(messages, tools.specs)
        elif tools is not None and tools.active:
            shown = [spec.as_openai() for spec in tools.specs]
        try:
            return render_chat(self.template, messages, tools=shown, special_tokens=self.special_tokens,
                               add_generation_prompt=add_generation_prompt,
                               **template_switch(self.has_thinking_switch, effort))
        except ChatTemplateError as exc:
            raise ChatError(f"the model's chat template rejected the messages: {exc}", param="messages") from None

    def tool_grammar(self, tools: ToolSetup, answer_schema: dict[str, Any] | None = None) -> str | None:
        """The grammar of a reply that may call ``tools`` (None when it is free); ``answer_schema``: the JSON
        a reply that calls nothing must match."""
        return tool_grammar(self.tool_syntax, tools.specs, tools.choice, tools.parallel, self.tokenizer,
                            answer_schema=answer_schema)

    def reasoning(self, prompt_text: str, effort: str | None, max_tokens: int,
                  constrained: bool) -> ReasoningSetup | None:
        """How the reply's thinking is planned and split (None: the model does not think, or not now)."""
        return reasoning_setup(self.thinks, prompt_text, self.tokenizer, effort, max_tokens, constrained)

    def reply_text(self, reasoning: ReasoningSetup | None, tools: ToolSetup) -> ChoiceText:
        """A fresh splitter of one choice's reply text into message deltas."""
        return ChoiceText(ReasoningSplitter(reasoning.open_at_start) if reasoning else None,
                          ToolCallStream(self.tool_syntax, new_call_id) if tools.active else None)

    def message(self, deltas: list[dict]) -> dict:
        """The assistant message those deltas make (``reasoning_content`` present for thinking models)."""
        return assemble_message(deltas, self.thinks)
