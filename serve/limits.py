"""Per-key request rate limits (429), kept in memory for the server's lifetime (token budgets, which must
survive restarts, are in ``serve/ledger.py``)."""

from __future__ import annotations

import collections
import math
import threading
import time

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
