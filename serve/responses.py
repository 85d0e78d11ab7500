"""A reply as an OpenAI ``response`` object, or as the Responses API's typed stream of events.

Both come from one pass over ``Reply.updates()`` (``ResponseBuilder``): the stream is the events as they
happen, the whole response is the items the same pass built, so the two always agree. Output items, in the
order the model produces them: ``reasoning`` (thinking models), ``message`` (``output_text``), and one
``function_call`` per tool call.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from flaxchat.chat.errors import ChatError
from flaxchat.chat.reply import Reply
from flaxchat.chat.responses import ResponsesRequest
from flaxchat.serve.errors import from_chat_error

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ResponseBuilder:
    """Turns message deltas into output items and the events that build them (``events`` collects them)."""

    def __init__(self) -> None:
        self.output: list[dict] = []
        self.events: list[dict] = []
        self._open: str | None = None  # "reasoning", "message" or "call": the kind of the last, unfinished item
        self._calls: dict[int, dict] = {}  # tool call index -> its item

    def push(self, delta: dict, logprobs: list[dict]) -> None:
        if delta.get("reasoning_content"):
            self._text("reasoning", "reasoning_text", delta["reasoning_content"], [])
        if delta.get("content"):
            self._text("message", "output_text", delta["content"], logprobs)
        for piece in delta.get("tool_calls", ()):
            self._call(piece)

    def finish(self, status: str) -> None:
        self._close(status)

    # ---- items -----------------------------------------------------------------------------------------
    def _start(self, kind: str, item: dict) -> dict:
        self._close("completed")
        self._open = kind
        self.output.append(item)
        self._emit("response.output_item.added", output_index=len(self.output) - 1, item=_snapshot(item))
        return item

    def _text(self, kind: str, part_type: str, text: str, logprobs: list[dict]) -> None:
        if self._open != kind:
            if kind == "reasoning":
                item = {"type": "reasoning", "id": _item_id("rs"), "summary": [], "content": [], "status": "in_progress"}
            else:
                item = {"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant",
                        "content": []}
            self._start(kind, item)
            part = {"type": part_type, "text": ""} | ({"annotations": [], "logprobs": []} if kind == "message" else {})
            item["content"].append(part)
            self._emit("response.content_part.added", **self._where(), content_index=0, part=_snapshot(part))
        item = self.output[-1]
        part = item["content"][0]
        part["text"] += text
        if kind == "message":
            part["logprobs"] += logprobs
            self._emit("response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=logprobs)
        else:
            self._emit("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)

    def _call(self, piece: dict) -> None:
        index, function = piece["index"], piece["function"]
        if index not in self._calls:
            self._calls[index] = self._start("call", {"type": "function_call", "id": _item_id("fc"), "call_id": piece["id"],
                                                      "name": function["name"], "arguments": "", "status": "in_progress"})
        item = self._calls[index]
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            self._emit("response.function_call_arguments.delta", **self._where(), delta=function["arguments"])

    def _close(self, status: str) -> None:
        if self._open is None:
            return
        item, kind = self.output[-1], self._open
        self._open = None
        if kind == "call":
            self._emit("response.function_call_arguments.done", **self._where(), name=item["name"],
                       arguments=item["arguments"])
        else:
            part = item["content"][0]
            if kind == "message":
                self._emit("response.output_text.done", **self._where(), content_index=0, text=part["text"],
                           logprobs=part["logprobs"])
            else:
                self._emit("response.reasoning_text.done", **self._where(), content_index=0, text=part["text"])
            self._emit("response.content_part.done", **self._where(), content_index=0, part=_snapshot(part))
        item["status"] = status
        self._emit("response.output_item.done", output_index=len(self.output) - 1, item=_snapshot(item))

    def _where(self) -> dict:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}

    def _emit(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, **fields})


def _snapshot(value: dict) -> dict:
    return json.loads(json.dumps(value))


class ResponsesRendering:
    """One reply to a ``POST /v1/responses`` request, whole or as server-sent events."""

    done_marker = b""  # the Responses stream ends with its response.completed event, no [DONE]

    def __init__(self, reply: Reply, model_name: str, request: ResponsesRequest):
        self.reply, self.request = reply, request
        self.id = _item_id("resp")
        self.created = int(time.time())
        self.model_name = model_name
        self._sequence = 0

    def response(self, status: str, output: list[dict], incomplete: str | None = None) -> dict:
        request = self.request
        done = status in ("completed", "incomplete")
        text = request.text.model_dump(by_alias=True, exclude_none=True) if request.text else {"format": {"type": "text"}}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if done else None, "model": self.model_name, "output": output,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "tools": [tool.model_dump(exclude_none=True) for tool in request.function_tools()],
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "text": text, "reasoning": request.reasoning.model_dump(exclude_none=True) if request.reasoning else None,
            "metadata": request.metadata or {}, "store": False, "previous_response_id": None,
            "truncation": request.truncation or "disabled", "user": request.user,
            "usage": self._usage() if done else None,
        }

    def _usage(self) -> dict:
        usage = self.reply.usage()
        return {"input_tokens": usage["prompt_tokens"],
                # cache writes are not counted per request here (the prefix cache stores whole blocks as it goes)
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                         "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]}

    async def _build(self) -> AsyncIterator[tuple[ResponseBuilder, str | None]]:
        """Runs the reply through a builder, yielding it after each update (and the finish reason at the end)."""
        builder = ResponseBuilder()
        async for update in self.reply.updates():
            logprobs = update.logprobs
            for delta in update.deltas:
                builder.push(delta, logprobs)
                logprobs = []
            if update.finish_reason:
                builder.finish("incomplete" if update.finish_reason in INCOMPLETE else "completed")
                yield builder, update.finish_reason
                return
            yield builder, None

    async def completion(self) -> dict:
        builder, finish = ResponseBuilder(), None
        async for builder, finish in self._build():
            pass
        return self.response("incomplete" if finish in INCOMPLETE else "completed", builder.output, INCOMPLETE.get(finish))

    async def chunks(self) -> AsyncIterator[dict]:
        yield self._event("response.created", response=self.response("in_progress", []))
        yield self._event("response.in_progress", response=self.response("in_progress", []))
        sent = 0
        async for builder, finish in self._build():
            for event in builder.events[sent:]:
                yield self._event(event.pop("type"), **event)
            sent = len(builder.events)
            if finish is not None:
                status = "incomplete" if finish in INCOMPLETE else "completed"
                yield self._event(f"response.{status}", response=self.response(status, builder.output, INCOMPLETE.get(finish)))

    def _event(self, kind: str, **fields: Any) -> dict:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence - 1, **fields}

    def frame(self, event: dict) -> bytes:
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    def error_frame(self, error: ChatError) -> bytes:
        body = from_chat_error(error).body()["error"]
        return self.frame(self._event("error", code=body.get("code"), message=body["message"], param=body.get("param")))
