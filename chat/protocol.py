"""Pydantic models of the chat-completions request, fields in the order of the OpenAI reference.

Every accepted field is honoured; a field the model does not declare is refused with a 400 naming it
(``extra="forbid"``), never silently dropped. Cross-field rules live in ``chat/request.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    items = [value] if isinstance(value, str) else value or []
    if len(items) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    if any(not s for s in items):
        raise ValueError("stop sequences must not be empty")
    return value


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    for token, bias in (value or {}).items():
        if not token.lstrip("-").isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias value for token {token} must be between -100 and 100")
    return value


# Fields both the chat and the legacy completion request take, with the same rules.
Stop = Annotated[str | list[str] | None, AfterValidator(_check_stop)]
LogitBias = Annotated[dict[str, float] | None, AfterValidator(_check_logit_bias)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # What a client sends back when it echoes an earlier reply: accepted, not shown to the model.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: FunctionCall | None = None  # legacy: an assistant's call (becomes a tool call)

    @model_validator(mode="after")
    def _role_rules(self) -> "Message":
        problem = None
        if self.role == "tool" and not self.tool_call_id:
            problem = "a tool message needs tool_call_id (the id of the call it answers)"
        elif self.role == "function" and not self.name:
            problem = "a function message needs the name of the function it answers"
        elif self.role != "assistant" and self.content is None:
            problem = f"a {self.role} message needs content"
        elif self.role == "assistant" and self.content is None and not (self.tool_calls or self.function_call):
            problem = "an assistant message needs content or tool_calls"
        elif (self.tool_calls or self.function_call) and self.role != "assistant":
            problem = "only assistant messages carry tool_calls"
        elif self.tool_call_id and self.role != "tool":
            problem = "only tool messages carry tool_call_id"
        if problem:
            raise PydanticCustomError("invalid_message", problem)
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError("json_schema is only allowed with response_format type json_schema")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# Documented request fields this server cannot honour, with the reason it gives (a 422 naming the field).
REFUSED_FIELDS = {
    "audio": "audio output is not available: this server generates text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not available",
    "moderation": "moderation is not available",
}


class ChatCompletionRequest(BaseModel):
    """Every field of OpenAI's ``CreateChatCompletionRequest``: honoured, accepted without effect where it is
    bookkeeping or a hint with no use here, or refused (``REFUSED_FIELDS``); anything else is a 400."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    reasoning_effort: Any = None
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    tool_choice: Any = None
    tools: Any = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None
    # Legacy function calling: read as tools / tool_choice, answered as message.function_call.
    functions: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | dict[str, str] | None = None
    # Accepted, no effect: bookkeeping, or hints this server has no use for (the prefix cache finds shared
    # prompts by their tokens, so a cache key adds nothing).
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    modalities: list[Literal["text"]] | None = None  # "audio" is a value this server refuses (422)
    # Refused when given (REFUSED_FIELDS)
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: Any = None
    # Extras (vLLM/llama.cpp style)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)

    @field_validator(*REFUSED_FIELDS)
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise PydanticCustomError("unsupported", REFUSED_FIELDS[info.field_name])
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` in llama.cpp's shape (``content``, ``add_special``, ``with_pieces``) or vLLM's
    (``model``, ``prompt`` or chat ``messages``, ``add_special_tokens``, ``add_generation_prompt``)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    with_pieces: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if sum(x is not None for x in (self.content, self.prompt, self.messages)) != 1:
            raise PydanticCustomError("missing", "give exactly one of content, prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text (llama.cpp's and vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` (legacy text completions): the prompt is text or token ids, no chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 with echo scores the prompt alone
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    logit_bias: LogitBias = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=20)
    user: str | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise PydanticCustomError("unsupported", "suffix (insertion) is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("the prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
