"""One chat request on its way in: ``prepare`` (pure: validated once, rendered, tokenized, its grammar
compiled once) and ``submit``. The reply comes back through ``chat/reply.py``; every endpoint that answers
a chat request (JSON, SSE) renders the same ``Reply``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import regex

from flaxchat.chat.errors import ChatError
from flaxchat.chat.format import ChatFormat, ToolSetup
from flaxchat.chat.protocol import ChatCompletionRequest, CompletionRequest, Message
from flaxchat.chat.reasoning import EFFORTS, ReasoningSetup
from flaxchat.chat.tools import ToolChoice, parse_tool_choice, parse_tools
from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.constraints import ConstraintError, json_schema_grammar
from flaxchat.sampling.detokenizer import compiled_patterns
from flaxchat.sampling.engine import Engine
from flaxchat.sampling.params import SamplingParams, ThinkingPlan
from flaxchat.sampling.requests import EngineStoppedError, PromptTooLongError, QueueFullError, RequestHandle


@dataclass(frozen=True)
class ServedModel:
    """What the server exposes: the engine, its tokenizer and chat format, and the names it answers to."""

    id: str
    engine: Engine
    tokenizer: Tokenizer
    chat_template: str
    fingerprint: str
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    content_filter: tuple[str, ...] = ()  # regular expressions no prompt or reply may contain (load_content_filter)
    provenance: Mapping[str, str] = field(default_factory=dict)  # checkpoints/provenance.py: what the fingerprint hashes
    format: ChatFormat = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", ChatFormat(self.chat_template, self.tokenizer))
        longest_token_chars(self.tokenizer)  # now rather than in the first request (~0.1 s over the vocabulary)

    def answers_to(self, name: str) -> bool:
        return name == self.id or name in self.aliases


NO_TOOLS = ToolSetup((), ToolChoice("none"), False)


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    tools: ToolSetup
    reasoning: ReasoningSetup | None
    stop_ids: frozenset[int]  # tokens that end a choice (never shown as text or logprobs)
    legacy_functions: bool = False  # asked with `functions`: the call is answered as message.function_call


def check_request(request: ChatCompletionRequest) -> None:
    """Rules between fields that the request model does not express."""
    if request.top_logprobs and not request.logprobs:
        raise ChatError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise ChatError("stream_options is only allowed when stream is true", param="stream_options")
    if request.reasoning_effort is not None and request.reasoning_effort not in EFFORTS:
        raise ChatError(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {request.reasoning_effort!r}",
                        param="reasoning_effort")


def tool_setup(request: ChatCompletionRequest) -> ToolSetup:
    """The request's tools; legacy ``functions``/``function_call`` read as function tools (one call at most)."""
    tools, choice = request.tools, request.tool_choice
    parallel = True if request.parallel_tool_calls is None else request.parallel_tool_calls
    if request.functions is not None:
        if tools is not None:
            raise ChatError("give either tools or the legacy functions, not both", param="functions")
        tools, parallel = [{"type": "function", "function": f} for f in request.functions], False
        call = request.function_call
        choice = call if call is None or isinstance(call, str) else {"type": "function", "function": call}
    elif request.function_call is not None:
        raise ChatError("function_call is only allowed with functions", param="function_call")
    specs = parse_tools(tools)
    return ToolSetup(specs, parse_tool_choice(choice, specs), parallel)


def message_dicts(conversation: list[Message]) -> list[dict[str, Any]]:
    """The conversation as the plain dicts chat templates read."""
    messages, legacy_call = [], None
    for i, message in enumerate(conversation):
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.function_call:  # legacy: the call becomes a tool call, its "function" answer a tool message
            legacy_call = f"call_{i}"
            item["tool_calls"] = [{"id": legacy_call, "type": "function", "function": message.function_call.model_dump()}]
        if message.role == "function":
            item["role"], item["tool_call_id"] = "tool", legacy_call
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        messages.append(item)
    return messages


def response_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks for: any JSON object, or the given schema (None: free text)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    schema = fmt.json_schema.schema_
    if not isinstance(schema, dict) or not schema:
        raise ChatError("response_format.json_schema.schema must be a non-empty JSON schema object",
                        param="response_format.json_schema.schema", code="invalid_json_schema")
    return schema


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token can cover: its vocabulary's longest token, in bytes (at least 1)."""
    return tokenizer.derived("longest_token_bytes",
                             lambda: max(1, *(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))))


def check_length_before_tokenizing(model: ServedModel, text: str) -> None:
    """Refuse a prompt that cannot fit before paying to tokenize it (a megabyte takes ~1.5 s): no token covers
    more characters than the vocabulary's longest token has bytes, so longer text needs more tokens than the
    context holds."""
    if len(text) > model.engine.max_len * longest_token_chars(model.tokenizer):
        raise ChatError(f"This model's maximum context length is {model.engine.max_len} tokens, but the messages "
                        f"take more than that ({len(text)} characters).", param="messages",
                        code="context_length_exceeded", status=400)


def reply_budget(request: ChatCompletionRequest | CompletionRequest, context: int, prompt_len: int) -> int:
    """The completion's token budget: what the request asks for, else the rest of the context. Raises
    ``ChatError`` (context_length_exceeded) when the prompt, or the prompt plus the budget, does not fit."""
    room = context - prompt_len
    if room < 1:
        raise ChatError(f"This model's maximum context length is {context} tokens, but the messages take "
                        f"{prompt_len} tokens.", param="messages", code="context_length_exceeded", status=400)
    completion_limit = getattr(request, "max_completion_tokens", None)
    limit_name = "max_completion_tokens" if completion_limit is not None else "max_tokens"
    max_tokens = completion_limit or request.max_tokens
    if max_tokens is not None and prompt_len + max_tokens > context:
        raise ChatError(f"This model's maximum context length is {context} tokens. However, you requested "
                        f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in "
                        f"{limit_name}). Please reduce the length of the messages or {limit_name}.",
                        param=limit_name, code="context_length_exceeded", status=400)
    return room if max_tokens is None else max_tokens


def sampling_params(request: ChatCompletionRequest | CompletionRequest, vocab: int, budget: int, grammar: str | None,
                    thinking: ThinkingPlan | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
    """The engine's settings from a request's sampling fields (both endpoints name them alike)."""
    bias = {}
    for token, value in (request.logit_bias or {}).items():
        token_id = int(token)
        if not 0 <= token_id < vocab:
            raise ChatError(f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab - 1})",
                            param="logit_bias", code="invalid_parameter", status=422)
        bias[token_id] = value
    return SamplingParams(
        max_tokens=budget,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else max(request.top_p, 1e-6),  # top_p 0 keeps only the top token
        top_k=min(request.top_k or 0, vocab),  # k >= the vocabulary keeps every token (and fits an int32)
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias=MappingProxyType(bias),
        stop=request.stop_list(),
        seed=None if request.seed is None else request.seed % 2**64,
        n=request.n or 1,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
        thinking=thinking,
    )


def _grammar_error(tools: ToolSetup, exc: Exception) -> ChatError:
    param = "tools" if tools.active else "response_format"
    return ChatError(f"{param}: {exc}", param=param, code="invalid_json_schema")


def prepare(model: ServedModel, request: ChatCompletionRequest) -> Prepared:
    """Validate and translate ``request`` for ``model``'s engine; raises ``ChatError`` naming the field."""
    check_request(request)
    fmt = model.format
    tools = tool_setup(request)
    prompt_text = fmt.render(message_dicts(request.messages), tools, request.reasoning_effort)
    check_content(model, prompt_text, "messages")
    check_length_before_tokenizing(model, prompt_text)
    ids = model.tokenizer.encode(prompt_text)
    schema = response_schema(request)
    grammar = json_schema_grammar(schema) if schema is not None else None
    if tools.active:  # the reply is calls, or (auto) text or JSON that matches response_format
        grammar = fmt.tool_grammar(tools, answer_schema=schema)
    if grammar is not None:
        try:
            model.engine.check_grammar(grammar)  # compiled here, once; every choice copies it
        except ConstraintError as exc:
            raise _grammar_error(tools, exc) from None
    budget = reply_budget(request, model.engine.max_len, len(ids))
    reasoning = fmt.reasoning(prompt_text, request.reasoning_effort, budget, constrained=grammar is not None)
    params = sampling_params(request, model.tokenizer.vocab_size, budget, grammar, reasoning.plan if reasoning else None,
                             bool(request.logprobs), request.top_logprobs or 0)
    return Prepared(tuple(ids), replace(params, blocked=model.content_filter), tools, reasoning,
                    model.tokenizer.stop_ids | frozenset(params.stop_token_ids), legacy_functions=request.functions is not None)


def load_content_filter(path: str) -> tuple[str, ...]:
    """A content filter file: one pattern per line, literal text or ``re:`` and a regular expression (the
    ``regex`` module's syntax); blank lines and lines starting with ``#`` are skipped."""
    patterns = []
    with open(path, encoding="utf-8") as lines:
        for line in (raw.rstrip("\n") for raw in lines):
            if line.strip() and not line.startswith("#"):
                patterns.append(line[3:] if line.startswith("re:") else regex.escape(line))
    compiled_patterns(tuple(patterns))  # a bad expression fails at start
    return tuple(patterns)


def check_content(model: ServedModel, text: str, param: str) -> None:
    """A prompt that matches the server's content filter is refused (400, code ``content_filter``)."""
    if any(pattern.search(text) for pattern in compiled_patterns(model.content_filter)):
        raise ChatError("the prompt matches the server's content filter", param=param, code="content_filter",
                        status=400)


def prepare_completion(model: ServedModel, request: CompletionRequest) -> list[Prepared]:
    """One ``Prepared`` per prompt of a legacy completion request (no template, tools or reasoning)."""
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise ChatError("best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    if request.max_tokens == 0 and not request.echo:
        raise ChatError("max_tokens 0 asks for no completion: only meaningful with echo", param="max_tokens",
                        code="invalid_parameter")
    # echo with logprobs scores the prompt's tokens (evaluation harnesses); echo alone with no completion
    # still runs the prompt, to answer with its usage like any other request
    prompt_logprobs = (request.logprobs or 0) if request.echo and (request.logprobs is not None or
                                                                    request.max_tokens == 0) else None
    tokenizer, prepared = model.tokenizer, []
    for prompt in request.prompts():
        if isinstance(prompt, str):
            check_content(model, prompt, "prompt")
            check_length_before_tokenizing(model, prompt)
            ids = tokenizer.encode(prompt, add_bos=tokenizer.special.add_bos)
        else:
            ids = list(prompt)
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):  # (checked before decoding them)
                raise ChatError("the prompt contains token ids outside the vocabulary", param="prompt")
            check_content(model, tokenizer.decode(ids), "prompt")
        budget = reply_budget(request, model.engine.max_len, len(ids))
        params = sampling_params(request, tokenizer.vocab_size, budget, None, None, request.logprobs is not None,
                                 request.logprobs or 0)
        prepared.append(Prepared(tuple(ids), replace(params, blocked=model.content_filter, prompt_logprobs=prompt_logprobs),
                                 NO_TOOLS, None, tokenizer.stop_ids))
    return prepared


def submit(model: ServedModel, prepared: Prepared) -> RequestHandle:
    """Queue a prepared request; the engine's refusals become ``ChatError`` with their HTTP status."""
    try:
        return model.engine.submit(list(prepared.prompt_ids), prepared.params)
    except QueueFullError as exc:
        raise ChatError(f"The server is overloaded: {exc}. Retry shortly.", code="server_overloaded", status=503,
                        type="server_error", retry_after=1) from None
    except EngineStoppedError as exc:
        failed = model.engine.failure is not None
        raise ChatError(f"the engine has stopped ({exc}); the server needs a restart" if failed else
                        "the server is shutting down", code="engine_stopped" if failed else "server_shutting_down",
                        status=503, type="server_error", retry_after=None if failed else 1) from None
    except ConstraintError as exc:
        raise _grammar_error(prepared.tools, exc) from None
    except PromptTooLongError as exc:
        raise ChatError(str(exc), param="messages", code="context_length_exceeded", status=400) from None
    except ValueError as exc:
        raise ChatError(str(exc), code="invalid_parameter") from None
