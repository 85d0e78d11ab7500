"""A chat reply in OpenAI's two shapes: one ``chat.completion`` object, or ``chat.completion.chunk``s for
server-sent events. Both read the same ``Reply.updates()`` (``chat/reply.py``), so streamed and whole
replies agree."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

from flaxchat.chat.reply import Reply


class Rendering:
    """The id, timestamp and names every object of one reply carries."""

    def __init__(self, reply: Reply, model_name: str, include_usage: bool = False):
        self.reply, self.include_usage = reply, include_usage
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.head = {"id": self.id, "created": int(time.time()), "model": model_name,
                     "system_fingerprint": reply.model.fingerprint}

    async def completion(self) -> dict:
        """The whole reply as one ``chat.completion``."""
        n, logprobs_on = self.reply.prepared.params.n, self.reply.prepared.params.logprobs
        deltas: list[list[dict]] = [[] for _ in range(n)]
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        async for update in self.reply.updates():
            deltas[update.index] += update.deltas
            logprobs[update.index] += update.logprobs
            finish[update.index] = update.finish_reason or finish[update.index]
        choices = [{"index": i, "message": self.reply.message(deltas[i]),
                    "logprobs": {"content": logprobs[i]} if logprobs_on else None, "finish_reason": finish[i]}
                   for i in range(n)]
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": self.reply.usage()}

    def _chunk(self, choice: dict) -> dict:
        chunk = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

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
            yield {**self.head, "object": "chat.completion.chunk", "choices": [], "usage": self.reply.usage()}
