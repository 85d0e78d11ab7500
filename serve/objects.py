"""What the server sends, as pydantic models: chat completions and their chunks, legacy text completions, and
errors. The renderers (``serve/render.py``, ``serve/errors.py``) build these, so a reply that breaks its
declared shape fails where it is built, and ``/openapi.json`` describes the responses from the same models.

OpenAI's objects mix fields that are always present, ``null`` included (``logprobs``, ``finish_reason``,
``refusal``), with fields that appear only when they mean something (a delta's ``content``, a message's
``tool_calls``, ``reasoning_content`` of thinking models). Fields of the second kind are declared with
``omitted_unless_set()``: ``wire()`` leaves them out unless the builder set them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

_OMIT = "x-omitted-unless-set"  # also how /openapi.json marks such fields


def omitted_unless_set(**kwargs: Any) -> Any:
    """A field that is left out of the JSON unless it was set when the object was built."""
    return Field(None, json_schema_extra={_OMIT: True}, **kwargs)


class Wire(BaseModel):
    """A JSON object the server sends."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: Any) -> dict:
        data = handler(self)
        for name, field in type(self).model_fields.items():
            if (field.json_schema_extra or {}).get(_OMIT) and name not in self.model_fields_set:
                data.pop(name, None)
        return data

    def wire(self) -> dict:
        return self.model_dump(mode="json")


# ---- logprobs --------------------------------------------------------------------------------------------
class TopLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Wire):
    content: list[TokenLogprob] | None


# ---- chat completions ---------------------------------------------------------------------------------------
class CalledFunction(Wire):
    name: str
    arguments: str


class CalledTool(Wire):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(Wire):
    role: Literal["assistant"]
    content: str | None
    refusal: None  # required by the official schema; this server never refuses
    reasoning_content: str | None = omitted_unless_set()  # thinking models
    tool_calls: list[CalledTool] | None = omitted_unless_set()
    function_call: CalledFunction | None = omitted_unless_set()  # legacy function calling


class PromptTokensDetails(Wire):
    cached_tokens: int


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatChoice(Wire):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"] | None


class ChatCompletion(Wire):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(Wire):
    name: str | None = omitted_unless_set()
    arguments: str | None = omitted_unless_set()


class ToolCallDelta(Wire):
    index: int
    id: str | None = omitted_unless_set()
    type: Literal["function"] | None = omitted_unless_set()
    function: FunctionCallDelta


class Delta(Wire):
    role: Literal["assistant"] | None = omitted_unless_set()
    content: str | None = omitted_unless_set()
    reasoning_content: str | None = omitted_unless_set()
    tool_calls: list[ToolCallDelta] | None = omitted_unless_set()
    function_call: FunctionCallDelta | None = omitted_unless_set()


class ChunkChoice(Wire):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"] | None


class ChatCompletionChunk(Wire):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = omitted_unless_set()  # null on every chunk but the last when usage is asked for


# ---- legacy text completions ----------------------------------------------------------------------------------
class TextLogprobs(Wire):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TextChoice(Wire):
    text: str
    index: int
    logprobs: TextLogprobs | None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class TextCompletion(Wire):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[TextChoice]
    usage: Usage | None = omitted_unless_set()


# ---- errors ------------------------------------------------------------------------------------------------
class ErrorBody(Wire):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Wire):
    error: ErrorBody
