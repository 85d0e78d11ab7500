"""``POST /v1/responses``, the stateless subset: the request model, and its translation into the chat request
the rest of the stack already serves (one request path: template, tools, grammars, reasoning, seeds).

What is refused, and why, is listed in ``RESPONSES_REFUSED`` (a 422 naming the field): this server keeps no
responses or conversations, runs no hosted tools, and generates text only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from flaxchat.chat.protocol import ChatCompletionRequest

RESPONSES_REFUSED = {
    "previous_response_id": "this server is stateless: it keeps no responses to continue (send the whole input)",
    "conversation": "this server is stateless: it keeps no conversations (send the whole input)",
    "prompt": "stored prompt templates are not available",
    "background": "background responses are not available",
}


class InputText(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    """A message item (``EasyInputMessage`` or a full input/output message item)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made earlier, sent back with the rest of the conversation."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningItem(BaseModel):
    """Earlier reasoning sent back: accepted and not shown to the model (chat templates drop it too)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(BaseModel):
    """The documented ``ResponseCreateParams`` fields: honoured, accepted without effect (bookkeeping), or
    refused (``RESPONSES_REFUSED``, ``store: true``, tools other than functions)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # an extension, as on the chat endpoint
    # Accepted, no effect
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "in-memory", "24h"] | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    stream_options: dict[str, Any] | None = None
    # Refused when given (RESPONSES_REFUSED)
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None

    @field_validator(*RESPONSES_REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value not in (None, False):
            raise PydanticCustomError("unsupported", RESPONSES_REFUSED[info.field_name])
        return value

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported", "this server keeps no responses: store must be false")
        return value

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: Any) -> Any:
        if isinstance(value, list) and not any(isinstance(item, InputMessage | FunctionCallOutputItem) for item in value):
            raise ValueError("the input needs at least one message")
        return value

    @field_validator("tools")
    @classmethod
    def _function_tools_only(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for tool in tools or []:
            if tool.get("type") != "function":
                raise PydanticCustomError("unsupported", f"tools of type {tool.get('type')!r} are not available "
                                                         "here: only function tools")
            FunctionTool.model_validate(tool)
        return tools

    def function_tools(self) -> list[FunctionTool]:
        return [FunctionTool.model_validate(tool) for tool in self.tools or []]

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this one means (validated like any chat request)."""
        chat: dict[str, Any] = {"model": self.model, "messages": self._messages()}
        fields = {"max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "parallel_tool_calls": self.parallel_tool_calls, "seed": self.seed, "user": self.user}
        chat |= {name: value for name, value in fields.items() if value is not None}
        if self.tools:
            chat["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                             for tool in self.function_tools()]
        if isinstance(self.tool_choice, dict) and self.tool_choice.get("type") == "function":
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.get("name")}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        text_format = self.text.format if self.text else None
        if text_format is not None and text_format.type == "json_schema":
            spec = {"name": text_format.name or "response", "schema": text_format.schema_ or {},
                    "strict": text_format.strict, "description": text_format.description}
            chat["response_format"] = {"type": "json_schema",
                                       "json_schema": {k: v for k, v in spec.items() if v is not None}}
        elif text_format is not None:
            chat["response_format"] = {"type": text_format.type}
        if self.reasoning and self.reasoning.effort is not None:
            chat["reasoning_effort"] = self.reasoning.effort
        wants_logprobs = self.top_logprobs is not None or "message.output_text.logprobs" in (self.include or [])
        if wants_logprobs:
            chat |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        return ChatCompletionRequest.model_validate(chat)

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                elif last is not None and last["role"] == "assistant":
                    last["tool_calls"] = [call]
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        return messages
