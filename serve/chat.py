"""One chat request end to end, minus HTTP: request -> template -> tokens -> engine -> OpenAI objects."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.engine import Engine
from flaxchat.sampling.requests import EngineStoppedError, PromptTooLongError, QueueFullError
from flaxchat.sampling.params import SamplingParams, TokenEvent
from flaxchat.serve.chat_template import ChatTemplateError, render_chat
from flaxchat.sampling.constraints import ConstraintError, json_schema_grammar
from flaxchat.sampling.params import ThinkingPlan
from flaxchat.serve.errors import APIError
from flaxchat.serve.protocol import ChatCompletionRequest
from flaxchat.serve.reasoning import (EFFORTS, ReasoningSetup, ReasoningSplitter, reasoning_setup, template_switch,
                             template_thinks)
from flaxchat.serve.reply_text import ChoiceText, assemble_message, new_call_id
from flaxchat.serve.tool_parsers import ToolCallStream
from flaxchat.serve.tools import (ToolChoice, ToolSpec, check_conversation, detect_syntax, parse_tool_choice, parse_tools,
                         template_messages, tool_grammar, with_generic_tools)


@dataclass(frozen=True)
class ServedModel:
    """What the server exposes: the engine, its tokenizer and template, and the names it answers to."""

    id: str
    engine: Engine
    tokenizer: Tokenizer
    chat_template: str
    fingerprint: str
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    def answers_to(self, name: str) -> bool:
        return name == self.id or name in self.aliases


def _check_request(request: ChatCompletionRequest) -> None:
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if request.reasoning_effort is not None and request.reasoning_effort not in EFFORTS:
        raise APIError(400, f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {request.reasoning_effort!r}",
                       param="reasoning_effort", code="invalid_value")
    if request.parallel_tool_calls is not None and not isinstance(request.parallel_tool_calls, bool):
        raise APIError(400, "parallel_tool_calls must be a boolean", param="parallel_tool_calls")


@dataclass(frozen=True)
class ToolSetup:
    """The request's tools as this model sees them."""

    specs: tuple[ToolSpec, ...]
    choice: ToolChoice
    syntax: str  # see serve.tools
    parallel: bool

    @property
    def active(self) -> bool:
        return self.choice.mode != "none"


def tool_setup(model: ServedModel, request: ChatCompletionRequest) -> ToolSetup:
    specs = parse_tools(request.tools)
    choice = parse_tool_choice(request.tool_choice, specs)
    return ToolSetup(specs, choice, detect_syntax(model.chat_template),
                     True if request.parallel_tool_calls is None else request.parallel_tool_calls)


def render_prompt(model: ServedModel, request: ChatCompletionRequest, tools: ToolSetup) -> str:
    """The prompt text: messages (and tools, when the request may call them) through the chat template."""
    messages = []
    for message in request.messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        messages.append(item)
    check_conversation(messages)
    messages = template_messages(messages, tools.syntax)
    shown = None
    if tools.active and tools.syntax == "generic":
        messages = with_generic_tools(messages, tools.specs)
    elif tools.active:
        shown = [spec.as_openai() for spec in tools.specs]
    special = model.tokenizer.special
    try:
        return render_chat(model.chat_template, messages, tools=shown,
                           special_tokens={"bos_token": special.bos_token, "eos_token": special.eos_token},
                           **template_switch(model.chat_template, request.reasoning_effort))
    except ChatTemplateError as exc:
        raise APIError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None


def sampling_params(model: ServedModel, request: ChatCompletionRequest, prompt_len: int, grammar: str | None,
                    thinking: ThinkingPlan | None) -> SamplingParams:
    context = model.engine.max_len
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the messages take "
                            f"{prompt_len} tokens.", param="messages", code="context_length_exceeded")
    limit_name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and prompt_len + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in "
                            f"{limit_name}). Please reduce the length of the messages or {limit_name}.",
                       param=limit_name, code="context_length_exceeded")
    vocab = model.tokenizer.vocab_size
    bias = {}
    for token, value in (request.logit_bias or {}).items():
        token_id = int(token)
        if not 0 <= token_id < vocab:
            raise APIError(422, f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias", code="invalid_parameter")
        bias[token_id] = value
    top_p = 1.0 if request.top_p is None else max(request.top_p, 1e-6)  # top_p 0 keeps only the top token
    return SamplingParams(
        max_tokens=max_tokens or room,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias=MappingProxyType(bias),
        stop=request.stop_list(),
        seed=None if request.seed is None else request.seed % 2**64,
        n=request.n or 1,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        grammar=grammar,
        thinking=thinking,
    )


def reply_budget(model: ServedModel, request: ChatCompletionRequest, prompt_len: int) -> int:
    return request.max_completion_tokens or request.max_tokens or max(model.engine.max_len - prompt_len, 1)


def response_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks for: any JSON object, or the given schema (None: free text)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    schema = fmt.json_schema.schema_
    if not isinstance(schema, dict) or not schema:
        raise APIError(400, "response_format.json_schema.schema must be a non-empty JSON schema object",
                       param="response_format.json_schema.schema", code="invalid_json_schema")
    return schema


class Completion:
    """A submitted request and the OpenAI objects built from its events."""

    def __init__(self, model: ServedModel, request: ChatCompletionRequest):
        _check_request(request)
        self.model, self.request = model, request
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.tools = tool_setup(model, request)
        prompt_text = render_prompt(model, request, self.tools)
        ids = model.tokenizer.encode(prompt_text)
        schema = response_schema(request)
        grammar = json_schema_grammar(schema) if schema is not None else None
        if self.tools.active:  # the reply is calls, or (auto) text or JSON that matches response_format
            grammar = tool_grammar(self.tools.syntax, self.tools.specs, self.tools.choice, self.tools.parallel,
                                   model.tokenizer, answer_schema=schema)
        if grammar is not None:
            try:
                model.engine.check_grammar(grammar)
            except ConstraintError as exc:
                param = "tools" if self.tools.active else "response_format"
                raise APIError(400, f"{param}: {exc}", param=param, code="invalid_json_schema") from None
        self.reasoning: ReasoningSetup | None = reasoning_setup(
            model.chat_template, prompt_text, model.tokenizer, request.reasoning_effort,
            reply_budget(model, request, len(ids)), constrained=grammar is not None)
        self.params = sampling_params(model, request, len(ids), grammar,
                                      self.reasoning.plan if self.reasoning else None)
        self.stop_ids = model.tokenizer.stop_ids | frozenset(self.params.stop_token_ids)
        try:
            self.handle = model.engine.submit(ids, self.params)
        except QueueFullError as exc:
            raise APIError(503, f"The server is overloaded: {exc}. Retry shortly.", type="server_error",
                           code="server_overloaded", retry_after=1) from None
        except EngineStoppedError:
            raise APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down",
                           retry_after=1) from None
        except ConstraintError as exc:
            param = "tools" if self.tools.active else "response_format"
            raise APIError(400, f"{param}: {exc}", param=param, code="invalid_json_schema") from None
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(422, str(exc), code="invalid_parameter") from None
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0

    def cancel(self) -> None:
        self.handle.cancel()

    # ---- pieces -----------------------------------------------------------------------------------
    def _token_entry(self, token_id: int, logprob: float) -> dict:
        raw = self.model.tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def logprob_entries(self, event: TokenEvent) -> list[dict]:
        if event.token_id is None or event.logprob is None or self._is_stop_token(event):
            return []
        entry = self._token_entry(event.token_id, event.logprob)
        entry["top_logprobs"] = [self._token_entry(t.token_id, t.logprob) for t in event.top_logprobs]
        return [entry]

    def _is_stop_token(self, event: TokenEvent) -> bool:
        return event.finish_reason == "stop" and event.token_id in self.stop_ids

    @staticmethod
    def check_error(event: TokenEvent) -> None:
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", type="server_error", code="internal_error")
        if event.finish_reason == "cancelled":  # only the server stopping cancels a request whose client is there
            raise APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down",
                           retry_after=1)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.handle.cached_tokens}}

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.request.model,
                "system_fingerprint": self.model.fingerprint}

    # ---- reply text -> message parts -----------------------------------------------------------------
    def _splitter(self) -> ChoiceText:
        return ChoiceText(ReasoningSplitter(self.reasoning.open_at_start) if self.reasoning else None,
                          ToolCallStream(self.tools.syntax, new_call_id) if self.tools.active else None)

    def _finish_reason(self, finish: str | None, parts: ChoiceText) -> str | None:
        return "tool_calls" if finish == "stop" and parts.has_calls else finish

    # ---- whole reply ------------------------------------------------------------------------------
    async def response(self) -> dict:
        n = self.params.n
        parts = [self._splitter() for _ in range(n)]
        deltas: list[list[dict]] = [[] for _ in range(n)]
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        async for event in self.handle:
            self.check_error(event)
            i = event.choice - self.params.choice_offset
            deltas[i] += parts[i].push(event.text)
            if event.token_id is not None:
                self.completion_tokens += 1
            if self.params.logprobs:
                logprobs[i] += self.logprob_entries(event)
            if event.finish_reason:
                finish[i] = event.finish_reason
                deltas[i] += parts[i].finish()
        choices = [
            {"index": i, "message": assemble_message(deltas[i], template_thinks(self.model.chat_template)),
             "logprobs": {"content": logprobs[i]} if self.params.logprobs else None,
             "finish_reason": self._finish_reason(finish[i], parts[i])}
            for i in range(n)
        ]
        return {**self._base("chat.completion"), "choices": choices, "usage": self.usage()}

    # ---- stream -----------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {**self._base("chat.completion.chunk"), "choices": choices}
        if self.request.stream_options and self.request.stream_options.include_usage:
            chunk["usage"] = usage
        return chunk

    async def chunks(self) -> AsyncIterator[dict]:
        parts = [self._splitter() for _ in range(self.params.n)]
        for i in range(self.params.n):
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        async for event in self.handle:
            self.check_error(event)
            i = event.choice - self.params.choice_offset
            if event.token_id is not None:
                self.completion_tokens += 1
            entries = self.logprob_entries(event) if self.params.logprobs else []
            deltas = parts[i].push(event.text)
            if event.finish_reason:
                deltas += parts[i].finish()
            if entries and not deltas:
                deltas = [{"content": ""}]
            for k, delta in enumerate(deltas):
                yield self._chunk([{"index": i, "delta": delta,
                                    "logprobs": {"content": entries if k == 0 else []} if self.params.logprobs
                                    else None, "finish_reason": None}])
            if event.finish_reason:
                yield self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                    "finish_reason": self._finish_reason(event.finish_reason, parts[i])}])
        if self.request.stream_options and self.request.stream_options.include_usage:
            yield {**self._base("chat.completion.chunk"), "choices": [], "usage": self.usage()}
