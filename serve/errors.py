"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

One rule for request failures: what cannot be read as a request (malformed JSON, a missing field, a wrong
type, an unknown field) is a 400; a well-formed value that cannot be used (out of range, not allowed, an
unsupported feature or combination) is a 422. The exception is OpenAI's own: ``context_length_exceeded``
is a 400, which clients rely on to detect it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from flaxchat.chat.errors import ChatError
from flaxchat.serve.objects import ErrorBody, ErrorResponse

_RANGE_ERRORS = {
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short",
    "value_error", "literal_error", "enum",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).wire()


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error, named by its dotted location."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: {param}", param=param, code="missing_required_parameter")
    if first["type"] == "invalid_message":  # a message that breaks the conversation rules (e.g. tool without id)
        return APIError(400, message, param=param, code="invalid_value")
    if first["type"] == "unsupported":  # a documented field this server cannot honour (chat/protocol.py)
        return APIError(422, message, param=param, code="unsupported_parameter")
    if first["type"] in _RANGE_ERRORS:
        return APIError(422, message, type="invalid_request_error", param=param, code="invalid_parameter")
    return APIError(400, message, param=param, code="invalid_type")


def from_chat_error(exc: ChatError) -> APIError:
    return APIError(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, retry_after=exc.retry_after)
