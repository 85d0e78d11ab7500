"""One chat request on its way out: the engine's events for each choice become message deltas, logprob
entries and OpenAI finish reasons. ``Reply.updates()`` is the one consumer of a request's events; the JSON
and SSE renderers (``serve/render.py``) only shape its updates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from flaxchat.chat.errors import ChatError
from flaxchat.chat.request import Prepared, ServedModel
from flaxchat.sampling.params import TokenEvent
from flaxchat.sampling.requests import RequestHandle


@dataclass(frozen=True)
class Update:
    """What one engine event adds to choice ``index``."""

    index: int
    deltas: list[dict]  # message deltas: {"content"}, {"reasoning_content"}, {"tool_calls"}
    logprobs: list[dict]  # OpenAI logprob entries of the event's token (empty without logprobs)
    finish_reason: str | None  # OpenAI's: "tool_calls" when a reply that called tools stopped
    token_id: int | None = None  # the generated token (a stop token too), None for an event without one


@dataclass
class WholeChoice:
    """One choice's updates gathered (a whole reply rather than a stream)."""

    deltas: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def check_event(event: TokenEvent) -> None:
    """A choice that ended in an engine error or was cancelled under a client that is still there."""
    if event.finish_reason == "error":
        raise ChatError(f"generation failed: {event.error}", code="internal_error", status=500, type="server_error")
    if event.finish_reason == "cancelled":  # only the server stopping cancels a request whose client is there
        raise ChatError("the server is shutting down", code="server_shutting_down", status=503, type="server_error",
                        retry_after=1)


def _as_function_call(delta: dict) -> dict:
    """A tool-call delta as the legacy ``function_call`` delta (a request with ``functions`` makes one call)."""
    if "tool_calls" not in delta:
        return delta
    (piece,) = delta["tool_calls"]
    call = {"arguments": piece["function"].get("arguments", "")}
    if "name" in piece["function"]:
        call = {"name": piece["function"]["name"], **call}
    return {"function_call": call}


class Reply:
    def __init__(self, model: ServedModel, prepared: Prepared, handle: RequestHandle):
        self.model, self.prepared, self.handle = model, prepared, handle
        self.completion_tokens = 0
        self._texts = [model.format.reply_text(prepared.reasoning, prepared.tools) for _ in range(prepared.params.n)]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.prompt_ids)

    def cancel(self) -> None:
        self.handle.cancel()

    async def updates(self) -> AsyncIterator[Update]:
        params = self.prepared.params
        async for event in self.handle:
            check_event(event)
            i = event.choice - params.choice_offset
            if event.token_id is not None:
                self.completion_tokens += 1
            deltas = self._texts[i].push(event.text)
            finish = None
            if event.finish_reason:
                deltas += self._texts[i].finish()
                finish = "tool_calls" if event.finish_reason == "stop" and self._texts[i].has_calls else event.finish_reason
            if self.prepared.legacy_functions:
                deltas = [_as_function_call(delta) for delta in deltas]
                finish = "function_call" if finish == "tool_calls" else finish
            yield Update(i, deltas, self._logprob_entries(event) if params.logprobs else [], finish, event.token_id)

    async def whole(self) -> list[WholeChoice]:
        """Every choice's updates gathered, once all have finished."""
        choices = [WholeChoice() for _ in range(self.prepared.params.n)]
        async for update in self.updates():
            choice = choices[update.index]
            choice.deltas += update.deltas
            choice.logprobs += update.logprobs
            if update.token_id is not None:
                choice.token_ids.append(update.token_id)
            choice.finish_reason = update.finish_reason or choice.finish_reason
        return choices

    def message(self, deltas: list[dict]) -> dict:
        """The assistant message the deltas make (``deltas`` as ``updates()`` gave them)."""
        message = self.model.format.message(deltas)
        if self.prepared.legacy_functions:
            parts = [d["function_call"] for d in deltas if "function_call" in d]
            if parts:
                message["function_call"] = {"name": parts[0]["name"], "arguments": "".join(p["arguments"] for p in parts)}
                message["content"] = message["content"] or None
        return message

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.handle.cached_tokens}}

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        raw = self.model.tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def prompt_logprob_entries(self) -> list[dict]:
        """The scored prompt's tokens as logprob entries (the first one has no logprob and no alternatives);
        available once the first event has arrived."""
        entries = []
        for score in self.handle.prompt_logprobs or ():
            entry = self._token_entry(score.token_id, score.logprob)
            entry["top_logprobs"] = (None if score.logprob is None else
                                     [self._token_entry(t.token_id, t.logprob) for t in score.top_logprobs])
            entries.append(entry)
        return entries

    def _logprob_entries(self, event: TokenEvent) -> list[dict]:
        stop_token = event.finish_reason == "stop" and event.token_id in self.prepared.stop_ids
        if event.token_id is None or event.logprob is None or stop_token:
            return []
        entry = self._token_entry(event.token_id, event.logprob)
        entry["top_logprobs"] = [self._token_entry(t.token_id, t.logprob) for t in event.top_logprobs]
        return [entry]
