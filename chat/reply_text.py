"""One choice's reply text -> OpenAI message parts: reasoning split off first, then tool calls read from the
content. Streaming emits the deltas as they come; the whole reply assembles the same deltas, so both agree."""

from __future__ import annotations

import secrets
from typing import Any

from flaxchat.chat.reasoning import ReasoningSplitter
from flaxchat.chat.tool_parsers import ToolCallStream


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ChoiceText:
    """One choice's text -> deltas: reasoning split off first, then tool calls read from the content."""

    def __init__(self, reasoning: ReasoningSplitter | None, calls: ToolCallStream | None):
        self.reasoning, self.calls = reasoning, calls

    def push(self, text: str) -> list[dict]:
        thought, content = self.reasoning.push(text) if self.reasoning else ("", text)
        return self._deltas(thought, content, final=False)

    def finish(self) -> list[dict]:
        thought, content = self.reasoning.flush() if self.reasoning else ("", "")
        return self._deltas(thought, content, final=True)

    def _deltas(self, thought: str, content: str, final: bool) -> list[dict]:
        deltas: list[dict] = [{"reasoning_content": thought}] if thought else []
        if self.calls is None:
            return deltas + ([{"content": content}] if content else [])
        deltas += self.calls.push(content) if content else []
        return deltas + (self.calls.finish() if final else [])

    @property
    def has_calls(self) -> bool:
        return self.calls is not None and self.calls.call_count > 0


def assemble_message(deltas: list[dict], thinks: bool) -> dict:
    """The assistant message a streaming client would build from ``deltas``; ``reasoning_content`` is present
    (null when empty) for models that think."""
    content = "".join(d.get("content", "") for d in deltas)
    calls: list[dict] = []
    for delta in deltas:
        for piece in delta.get("tool_calls", ()):
            if piece["index"] == len(calls):
                calls.append({"id": piece["id"], "type": "function",
                              "function": {"name": piece["function"]["name"], "arguments": ""}})
            calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                               "refusal": None}  # required by the official schema; this server never refuses
    if thinks:
        message["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in deltas) or None
    if calls:
        message["tool_calls"] = calls
    return message
