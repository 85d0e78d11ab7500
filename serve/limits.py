"""Per-key request rate limits (429) and token budgets (402), kept in memory for the server's lifetime."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Mapping

from flaxchat.serve.errors import APIError


class RateLimiter:
    """At most ``per_minute`` requests per key in any 60-second window (sliding log)."""

    def __init__(self, per_minute: int | None):
        self.per_minute = per_minute
        self._log: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if not self.per_minute:
            return
        now = time.monotonic()
        with self._lock:
            log = self._log[key]
            while log and now - log[0] >= 60.0:
                log.popleft()
            if len(log) >= self.per_minute:
                wait = max(1, math.ceil(60.0 - (now - log[0])))
                raise APIError(429, f"Rate limit reached: {self.per_minute} requests per minute. Retry in {wait}s.",
                               type="rate_limit_error", code="rate_limit_exceeded", retry_after=wait)
            log.append(now)


class TokenBudgets:
    """Keys with a budget may spend that many tokens (prompt + completion) in total; then 402."""

    def __init__(self, budgets: Mapping[str, int]):
        self.budgets = dict(budgets)
        self.spent: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        budget = self.budgets.get(key)
        if budget is not None and self.spent[key] >= budget:
            raise APIError(402, f"This API key has used its budget of {budget} tokens.",
                           type="insufficient_quota", code="insufficient_quota")

    def charge(self, key: str, tokens: int) -> None:
        if key in self.budgets:
            with self._lock:
                self.spent[key] += tokens
