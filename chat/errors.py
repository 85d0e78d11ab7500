"""The chat layer's one error: a request the model's chat format cannot serve, named by the field at fault.

The HTTP layer turns it into an OpenAI-shaped error (``serve/errors.py``) with ``status``: 422 for a
well-formed value that cannot be used (the default), 400 for a malformed shape, 503 and 500 for the server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChatError(ValueError):
    message: str
    param: str | None = None
    code: str | None = "invalid_value"
    status: int = 422
    type: str = "invalid_request_error"
    retry_after: int | None = None  # seconds, for a 503

    def __str__(self) -> str:
        return self.message
