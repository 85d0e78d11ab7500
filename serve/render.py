"""Replies in OpenAI's shapes: one ``chat.completion`` object or ``chat.completion.chunk``s for server-sent
events (``Rendering``), and the legacy ``text_completion`` (``TextRendering``). All read the same
``Reply.updates()`` (``chat/reply.py``), so streamed and whole replies agree; every object goes out through
its model in ``serve/objects.py``."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from flaxchat.chat.errors import ChatError
from flaxchat.chat.reply import Reply, Update
from flaxchat.serve.errors import from_chat_error
from flaxchat.serve.objects import ChatCompletion, ChatCompletionChunk, TextCompletion


class ChunkStream:
    """How chat and text completions go out as server-sent events: ``data:`` lines, then ``[DONE]``."""

    done_marker = b"data: [DONE]\n\n"

    def frame(self, chunk: dict) -> bytes:
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()

    def error_frame(self, error: ChatError) -> bytes:
        """An error after the headers are gone: reported in the stream, as OpenAI does."""
        return self.frame(from_chat_error(error).body())


class Rendering(ChunkStream):
    """The id, timestamp and names every object of one reply carries."""

    def __init__(self, reply: Reply, model_name: str, include_usage: bool = False):
        self.reply, self.include_usage = reply, include_usage
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.head = {"id": self.id, "created": int(time.time()), "model": model_name,
                     "system_fingerprint": reply.model.fingerprint}

    async def completion(self) -> dict:
        """The whole reply as one ``chat.completion``."""
        logprobs_on = self.reply.prepared.params.logprobs
        choices = [{"index": i, "message": self.reply.message(c.deltas),
                    "logprobs": {"content": c.logprobs} if logprobs_on else None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(await self.reply.whole())]
        return ChatCompletion.model_validate({**self.head, "object": "chat.completion", "choices": choices,
                                              "usage": self.reply.usage()}).wire()

    def _chunk(self, choice: dict) -> dict:
        chunk = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return ChatCompletionChunk.model_validate(chunk).wire()

    async def chunks(self) -> AsyncIterator[dict]:
        """The reply as ``chat.completion.chunk`` objects: each choice's role first, then its deltas (the
        first of an event's deltas carries its logprobs), then its finish reason; usage last if asked."""
        logprobs_on = self.reply.prepared.params.logprobs
        for i in range(self.reply.prepared.params.n):
            yield self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None})
        async for update in self.reply.updates():
            deltas = update.deltas or ([{"content": ""}] if update.logprobs else [])
            for k, delta in enumerate(deltas):
                logprobs = {"content": update.logprobs if k == 0 else []} if logprobs_on else None
                yield self._chunk({"index": update.index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
            if update.finish_reason:
                yield self._chunk({"index": update.index, "delta": {}, "logprobs": None,
                                   "finish_reason": update.finish_reason})
        if self.include_usage:
            yield ChatCompletionChunk.model_validate({**self.head, "object": "chat.completion.chunk", "choices": [],
                                                      "usage": self.reply.usage()}).wire()


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's position."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((k, item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((k, exc))
        await queue.put((k, done))

    tasks = [asyncio.create_task(pump(k, stream)) for k, stream in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get())[1] is not done:
                if isinstance(item[1], BaseException):
                    raise item[1]
                yield item
    finally:
        for task in tasks:
            task.cancel()


class TextRendering(ChunkStream):
    """Legacy ``text_completion`` objects for the replies to one completion request's prompts: choice
    ``index`` is ``prompt * n + choice``; ``echo`` puts the prompt's text before each choice's."""

    def __init__(self, replies: list[Reply], model_name: str, echoes: list[str] | None = None,
                 include_usage: bool = False):
        self.replies, self.include_usage = replies, include_usage
        self.n = replies[0].prepared.params.n
        self.logprobs_on = replies[0].prepared.params.logprobs
        self.echoed = echoes is not None
        self.echoes = echoes or [""] * len(replies)
        self.id = "cmpl-" + secrets.token_hex(12)
        self.head = {"id": self.id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                     "system_fingerprint": replies[0].model.fingerprint}

    def usage(self) -> dict:
        usages = [reply.usage() for reply in self.replies]
        total = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {**total, "prompt_tokens_details": {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                                         for u in usages)}}

    @staticmethod
    def _text(update: Update) -> str:
        return "".join(delta.get("content", "") for delta in update.deltas)

    def _logprobs(self, entries: list[dict], offset: int, echoed: list[dict] = ()) -> dict:
        """OpenAI's legacy logprobs: parallel lists, alternatives as {token: logprob} (None for an echoed first
        token), character offsets (``echoed`` prompt tokens from 0, generated ones from ``offset``)."""
        offsets, echo_offset = [], 0
        for entry in echoed:
            offsets.append(echo_offset)
            echo_offset += len(entry["token"])
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["token"])
        entries = [*echoed, *entries]
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries],
                "text_offset": offsets}

    def _echoed_entries(self, reply: Reply) -> list[dict]:
        """The prompt's scored tokens, which come first in an echoed choice's logprobs."""
        return reply.prompt_logprob_entries() if self.echoed else []

    async def completion(self) -> dict:
        choices = []
        for k, reply in enumerate(self.replies):
            texts, entries = [self.echoes[k]] * self.n, [[] for _ in range(self.n)]
            finish: list[str | None] = [None] * self.n
            async for update in reply.updates():
                texts[update.index] += self._text(update)
                entries[update.index] += update.logprobs
                finish[update.index] = update.finish_reason or finish[update.index]
            echoed = self._echoed_entries(reply)
            choices += [{"text": texts[i], "index": k * self.n + i, "finish_reason": finish[i],
                         "logprobs": self._logprobs(entries[i], len(self.echoes[k]), echoed) if self.logprobs_on else None}
                        for i in range(self.n)]
        return TextCompletion.model_validate({**self.head, "choices": choices, "usage": self.usage()}).wire()

    async def chunks(self) -> AsyncIterator[dict]:
        offsets: dict[int, int] = {}
        async for k, update in _merged([reply.updates() for reply in self.replies]):
            index, generated = k * self.n + update.index, self._text(update)
            first = index not in offsets  # the choice's first chunk: its echo (and the prompt's logprobs) first
            echo, echoed = (self.echoes[k], self._echoed_entries(self.replies[k])) if first else ("", [])
            start = offsets.get(index, 0) + len(echo)  # where this update's generated text starts
            text, offsets[index] = echo + generated, start + len(generated)
            logprobs = self._logprobs(update.logprobs, start, echoed) if self.logprobs_on else None
            if text or update.logprobs:
                yield self._chunk({"text": text, "index": index, "logprobs": logprobs, "finish_reason": None})
            if update.finish_reason:
                yield self._chunk({"text": "", "index": index, "logprobs": None, "finish_reason": update.finish_reason})
        if self.include_usage:
            yield TextCompletion.model_validate({**self.head, "choices": [], "usage": self.usage()}).wire()

    def _chunk(self, choice: dict) -> dict:
        chunk = {**self.head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return TextCompletion.model_validate(chunk).wire()
