"""Reading tool calls out of a reply, whole or while it streams.

``scan(syntax, text, final)`` returns the content that is safe to show and the calls seen so far (a call's
``arguments`` is the raw JSON text the model wrote, growing while it streams). ``ToolCallStream`` emits the
difference between successive scans as OpenAI deltas: content first, then for each call its ``index``,
``id``, ``type`` and ``name`` once the name is complete, then argument fragments. The whole reply is
``scan(..., final=True)`` of the same text, so streamed deltas always assemble to the non-streamed reply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from flaxchat.sampling.detokenizer import partial_suffix

# What opens a tool call in each syntax's replies (llama3's calls are bare JSON, optionally after PYTHON_TAG).
TRIGGERS = {"hermes": "<tool_call>", "generic": "<tool_call>", "mistral": "[TOOL_CALLS]"}
PYTHON_TAG = "<|python_tag|>"
_CALL_HEAD = {key: re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"' + key + r'"\s*:\s*')
              for key in ("arguments", "parameters")}
_SCALAR = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")


@dataclass
class PartialCall:
    name: str
    arguments: str  # raw JSON text so far
    complete: bool  # the arguments value is complete


@dataclass
class Scan:
    content: str
    calls: list[PartialCall] = field(default_factory=list)


def json_value_end(text: str, pos: int) -> int | None:
    """Index just past the JSON value starting at ``pos`` (blanks skipped), or None if it is not complete."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] == '"':
        i = pos + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return i + 1
            i += 1
        return None
    if text[pos] in "{[":
        depth, i, in_string = 0, pos, False
        while i < len(text):
            ch = text[i]
            if in_string:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    match = _SCALAR.match(text, pos)
    if match and match.end() < len(text):
        return match.end()
    return None


def _read_call(text: str, pos: int, key: str) -> tuple[PartialCall | None, int | None]:
    """One ``{"name": ..., key: ...}`` object at ``pos``: (the call or None if its name is not complete,
    index past the object or None if it is not closed)."""
    head = _CALL_HEAD[key].match(text, pos)
    if head is None:
        return None, None
    name = json.loads(head.group(1))
    start = head.end()
    end = json_value_end(text, start)
    if end is None:
        return PartialCall(name, text[start:].rstrip(), False), None
    call = PartialCall(name, text[start:end], True)
    close = re.compile(r"\s*\}").match(text, end)
    return call, close.end() if close else None


def _tagged_calls(text: str, at: int, syntax: str) -> list[PartialCall]:
    trigger = TRIGGERS[syntax]
    calls = []
    if syntax == "mistral":
        opening = re.compile(r"\s*\[").match(text, at + len(trigger))
        pos = opening.end() if opening else None
        while pos is not None:
            call, end = _read_call(text, pos, "arguments")
            if call is not None:
                calls.append(call)
            if end is None:
                break
            separator = re.compile(r"\s*,").match(text, end)
            pos = separator.end() if separator else None
        return calls
    while at >= 0:
        call, _ = _read_call(text, at + len(trigger), "arguments")
        if call is not None:
            calls.append(call)
        at = text.find(trigger, at + len(trigger))
    return calls


def scan(syntax: str, text: str, final: bool) -> Scan:
    """Content and calls in ``text``; unless ``final``, content that might still turn into a call is held."""
    if syntax == "llama3":
        stripped = text.lstrip()
        body = stripped[len(PYTHON_TAG):] if stripped.startswith(PYTHON_TAG) else stripped
        if body.startswith("{"):
            call, _ = _read_call(body, 0, "parameters")
            calls = [call] if call is not None else []
            if calls or not final:
                return Scan("", calls)
            return Scan(text)
        if not final and (PYTHON_TAG.startswith(stripped) or not stripped):
            return Scan("")
        return Scan(text)
    trigger = TRIGGERS[syntax]
    at = text.find(trigger)
    if at < 0:
        return Scan(text if final else text[: len(text) - partial_suffix(text, trigger)].rstrip())
    calls = _tagged_calls(text, at, syntax)
    content = text[:at].rstrip()
    if final and not calls:
        return Scan(text)
    return Scan(content, calls)


class ToolCallStream:
    """Turns content deltas into OpenAI ``delta`` dicts (``content`` and ``tool_calls``)."""

    def __init__(self, syntax: str, new_id: Callable[[], str]):
        self.syntax = syntax
        self.text = ""
        self._content = 0
        self._calls: list[tuple[str, int]] = []  # (id, argument characters sent)
        self._new_id = new_id

    def push(self, delta: str) -> list[dict]:
        self.text += delta
        return self._diff(scan(self.syntax, self.text, final=False))

    def finish(self) -> list[dict]:
        return self._diff(scan(self.syntax, self.text, final=True))

    def _diff(self, current: Scan) -> list[dict]:
        deltas: list[dict] = []
        if len(current.content) > self._content:
            deltas.append({"content": current.content[self._content:]})
            self._content = len(current.content)
        for index, call in enumerate(current.calls):
            if index == len(self._calls):
                call_id = self._new_id()
                self._calls.append((call_id, 0))
                deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            call_id, sent = self._calls[index]
            if len(call.arguments) > sent:
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments[sent:]}}]})
                self._calls[index] = (call_id, len(call.arguments))
        return deltas

    @property
    def call_count(self) -> int:
        return len(self._calls)
