"""What a caller of the engine holds: the handle a submitted request's events arrive on, and the errors
``Engine.submit`` raises. Events are pushed by the engine thread and read from any thread or asyncio loop.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from dataclasses import dataclass, replace

from flaxchat.sampling.params import PromptTokenScore, SamplingParams, TokenEvent


class EngineError(RuntimeError):
    """Base class for errors the engine reports to callers."""


class QueueFullError(EngineError):
    """All slots are busy and the waiting queue is full; the server answers 503 with Retry-After."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt leaves no room for a single generated token in the context."""


class EngineStoppedError(EngineError):
    """The engine is not running."""


_END = object()


class RequestHandle:
    """Events of one request, in order; iterate synchronously or with ``async for``. ``cancel()`` frees its slots."""

    def __init__(self, request_id: int, n: int, seed: int):
        self.id, self.n, self.seed = request_id, n, seed
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache (set before the first event)
        self.prompt_logprobs: tuple[PromptTokenScore, ...] | None = None  # when asked for (set before the first event)
        self.cancelled = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None
        try:
            self._loop = asyncio.get_running_loop()
            self._aqueue = asyncio.Queue()
        except RuntimeError:
            pass
        self._open = n

    def cancel(self) -> None:
        self.cancelled.set()

    def _push(self, event: TokenEvent) -> None:
        items = [event]
        if event.finish_reason is not None:
            self._open -= 1
            if self._open == 0:
                items.append(_END)
        for item in items:
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
                except RuntimeError:  # the caller's loop is gone; nobody is listening
                    pass
            else:
                self._queue.put(item)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None:
            raise RuntimeError("this handle was created in an event loop: use `async for`")
        while (item := self._queue.get()) is not _END:
            yield item

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._aqueue is None:
            raise RuntimeError("this handle was not created in an event loop: iterate it synchronously")
        while (item := await self._aqueue.get()) is not _END:
            yield item

    def result(self) -> dict[int, list[TokenEvent]]:
        """Block until done; the events grouped by choice (synchronous handles only)."""
        grouped: dict[int, list[TokenEvent]] = collections.defaultdict(list)
        for event in self:
            grouped[event.choice].append(event)
        return dict(grouped)


@dataclass
class QueuedRequest:
    """A submitted request, or a group of its choices, waiting for slots (its seed is the handle's)."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    first: bool = True  # the request's first group (it reports the prefix-cache hit)

    def finish(self, reason: str, error: str | None = None) -> None:
        """End every choice of the request that never started (cancelled, refused, failed)."""
        for i in range(self.params.n):
            self.handle._push(TokenEvent(self.params.choice_offset + i, None, "", finish_reason=reason, error=error,
                                         seed=self.handle.seed))


class WaitingRequests:
    """Submitted requests (or groups of their choices) waiting for slots: the one structure callers and the
    engine thread share (under ``lock``). ``close`` refuses new ones and ends the waiting ones."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lock = threading.Condition()
        self.open = False
        self.refusing = False  # draining: started requests go on, new ones are refused (``refuse``)
        self.failure: str | None = None  # why the engine stopped, when it died
        self._items: collections.deque[QueuedRequest] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, groups: list[QueuedRequest]) -> None:
        with self.lock:
            if not self.open or self.refusing:
                raise EngineStoppedError(self.failure or "the engine is not running")
            if len(self._items) + len(groups) > self.capacity:
                raise QueueFullError(f"the request queue is full ({self.capacity} waiting)")
            self._items.extend(groups)
            self.lock.notify_all()

    def pop_fitting(self, free_slots: int) -> QueuedRequest | None:
        """The head request when its choices fit in ``free_slots`` (first come, first served)."""
        with self.lock:
            if not self._items or self._items[0].params.n > free_slots:
                return None
            return self._items.popleft()

    def drop_cancelled(self) -> None:
        with self.lock:
            cancelled = [p for p in self._items if p.handle.cancelled.is_set()]
            for pending in cancelled:
                self._items.remove(pending)
        for pending in cancelled:
            pending.finish("cancelled")

    def refuse(self) -> None:
        """Refuse new requests and end the waiting ones (``finish_reason='cancelled'``: the server is going
        away), while the engine goes on with the started ones."""
        self._end_waiting("cancelled", refusing=True)

    def close(self, reason: str, failure: str | None = None) -> None:
        """Stop: refuse new requests, end the waiting ones with ``reason``, and let the engine loop exit."""
        self._end_waiting(reason, failure, open=False)

    def _end_waiting(self, reason: str, failure: str | None = None, **state: bool) -> None:
        """Set ``state`` (``open`` / ``refusing``) and end every waiting request, under the lock."""
        with self.lock:
            for name, value in state.items():
                setattr(self, name, value)
            if not self.open:
                self.failure = failure
            waiting = list(self._items)
            self._items.clear()
            self.lock.notify_all()
        for pending in waiting:
            pending.finish(reason, failure)


def choice_groups(handle: RequestHandle, prompt: list[int], params: SamplingParams,
                  slots: int) -> list[QueuedRequest]:
    """A request with more choices than the engine has slots, as groups of at most ``slots`` choices that wait
    for slots one after the other and feed one handle. Each choice keeps its index, so its key and tokens are
    the same however the choices are grouped; a later group finds the prompt's blocks in the prefix cache."""
    return [QueuedRequest(handle, list(prompt), replace(params, n=min(slots, params.n - start),
                                                        choice_offset=params.choice_offset + start), start == 0)
            for start in range(0, params.n, slots)]


def check_prompt(prompt: list[int], vocab_size: int, max_len: int) -> None:
    """Raise ``ValueError`` for an empty prompt or unknown ids, ``PromptTooLongError`` when it leaves no room."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise ValueError("the prompt contains token ids outside the vocabulary")
    if len(prompt) >= max_len:
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens but the context holds {max_len} "
                                 f"(at least one position must be left for the reply)")


def collect_text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)
