"""Tool calling on the request side: validate ``tools``/``tool_choice``, render them into the prompt, and
build the grammar that makes a call valid by construction.

Syntaxes (chosen from the model's chat template by ``detect_syntax``):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen 2/2.5/3, Hermes);
  the template renders the tools itself.
- ``llama3``: a bare JSON object ``{"name": ..., "parameters": {...}}`` (Llama 3.1+ templates), one call.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
- ``generic``: for templates without tool support (SmolLM2): the hermes syntax in plain text, with the tool
  list and instructions added to the system message (``GENERIC_TOOL_PROMPT``), earlier calls written back as
  ``<tool_call>`` blocks and tool results as user messages wrapped in ``<tool_response>``.

``tool_choice``: ``none`` (tools are not shown and nothing is parsed), ``auto`` (free text, but once the model
opens a call the call is constrained), ``required`` (one or more calls, nothing else) and a named function
(exactly one call to it). ``parallel_tool_calls: false`` allows at most one call.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from flaxchat.model.tokenizer import Tokenizer
from flaxchat.chat.errors import ChatError
from flaxchat.chat.tool_parsers import PYTHON_TAG, TRIGGERS
from flaxchat.sampling.constraints import bounded_numbers

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

GENERIC_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # none | auto | required | named
    name: str | None = None


def _bad(message: str, param: str, code: str = "invalid_value", status: int = 422) -> ChatError:
    """A bad value (422); ``status=400`` for a malformed shape: wrong type, missing or unknown field."""
    return ChatError(message, param=param, code=code, status=status)


def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    """Validate ``tools`` (OpenAI function tools); a ``ChatError`` naming the first problem."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise _bad("'tools' must be a non-empty array of function tools", "tools", status=400)
    specs, seen = [], set()
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _bad(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where, status=400)
        function = tool["function"]
        unknown = set(tool) - {"type", "function"} | set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise _bad(f"{where} has unknown fields: {', '.join(sorted(unknown))}", where, "unknown_parameter", 400)
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise _bad(f"{where}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}", f"{where}.function.name")
        if name in seen:
            raise _bad(f"{where}.function.name {name!r} is defined twice", f"{where}.function.name")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.function.description must be a string", f"{where}.function.description",
                       status=400)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _bad(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters",
                       "invalid_json_schema", 400)
        if parameters.get("type", "object") != "object":
            raise _bad(f"{where}.function.parameters must describe an object (type 'object')",
                       f"{where}.function.parameters", "invalid_json_schema")
        specs.append(ToolSpec(name, description, parameters))
    return tuple(specs)


def parse_tool_choice(raw: Any, tools: tuple[ToolSpec, ...]) -> ToolChoice:
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if not tools:
        raise _bad("'tool_choice' is only allowed when 'tools' are specified", "tool_choice")
    if raw in ("none", "auto", "required"):
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if not isinstance(name, str):
            raise _bad("tool_choice.function.name must be a string", "tool_choice.function.name", status=400)
        if name not in {t.name for t in tools}:
            raise _bad(f"tool_choice names function {name!r}, which is not in 'tools' "
                       f"(defined: {', '.join(t.name for t in tools)})", "tool_choice.function.name")
        return ToolChoice("named", name)
    raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
               "{\"name\": ...}}", "tool_choice", status=422 if isinstance(raw, str) else 400)


def detect_syntax(template: str) -> str:
    """The tool-call syntax a chat template teaches its model (``generic`` when it has none)."""
    if "tools" not in template:
        return "generic"
    if TRIGGERS["hermes"] in template:
        return "hermes"
    if TRIGGERS["mistral"] in template:
        return "mistral"
    if PYTHON_TAG in template or "ipython" in template:
        return "llama3"
    return "generic"


# ---- the conversation -------------------------------------------------------------------------------
def check_conversation(messages: list[dict[str, Any]]) -> None:
    """Tool messages must answer a call made earlier; call arguments must be JSON objects (422 otherwise)."""
    open_ids: set[str] = set()
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            try:
                arguments = json.loads(call["function"]["arguments"])
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise _bad(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object encoded as a "
                           f"string", f"messages[{i}].tool_calls[{j}].function.arguments")
            open_ids.add(call["id"])
        if message["role"] == "tool" and message.get("tool_call_id") not in open_ids:
            raise _bad(f"messages[{i}] is a tool message for tool_call_id {message.get('tool_call_id')!r}, which no "
                       f"earlier assistant message called", f"messages[{i}].tool_call_id")


def mistral_call_id(call_id: str) -> str:
    """Mistral templates insist on 9-character alphanumeric call ids: a stable one derived from ours."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def template_messages(messages: list[dict[str, Any]], syntax: str) -> list[dict[str, Any]]:
    """Messages as the template expects them: HF templates want call arguments as dicts (and Mistral's want
    9-character call ids); the generic syntax writes calls and results as text."""
    out = []
    ids = mistral_call_id if syntax == "mistral" else (lambda call_id: call_id)
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if calls and syntax != "generic":
            message["tool_calls"] = [
                {**call, "id": ids(call["id"]),
                 "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in calls
            ]
        elif calls:
            blocks = ["<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                    "arguments": json.loads(c["function"]["arguments"])})
                      + "\n</tool_call>" for c in message.pop("tool_calls")]
            message["content"] = "\n".join(filter(None, [message.get("content") or "", *blocks]))
        if message["role"] == "tool":
            if syntax == "generic":
                message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
            else:
                message["tool_call_id"] = ids(message["tool_call_id"])
        out.append(message)
    return out


def with_generic_tools(messages: list[dict[str, Any]], tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """Add the generic tool prompt to the system message (creating one if needed)."""
    block = GENERIC_TOOL_PROMPT.format(tools="\n".join(json.dumps(t.as_openai()) for t in tools))
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "role": "system", "content": f"{messages[0]['content']}\n\n{block}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


# ---- grammars --------------------------------------------------------------------------------------
def _lark_literal(text: str) -> str:
    return json.dumps(text)


def _call_schema(tools: tuple[ToolSpec, ...], args_key: str) -> dict[str, Any]:
    """One call object: the name and the arguments of one of ``tools``. Definitions the parameters refer to
    (``#/$defs/...``, ``#/definitions/...``) move to the root, where those references point once the
    parameters are nested inside the call."""
    definitions: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    options = []
    for tool in tools:
        parameters = dict(tool.parameters)
        for key in definitions:
            for name, definition in (parameters.pop(key, None) or {}).items():
                if definitions[key].setdefault(name, definition) != definition:
                    raise ChatError(f"tools define {key}/{name} differently; give the definitions distinct names",
                                    param="tools", code="invalid_json_schema", status=422)
        options.append({"type": "object", "properties": {"name": {"const": tool.name}, args_key: parameters},
                        "required": ["name", args_key], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema.update({key: value for key, value in definitions.items() if value})
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _special_token(tokenizer: Tokenizer, text: str) -> int | None:
    token = tokenizer.token_to_id(text)
    return token if token is not None and token in tokenizer.special_ids else None


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\/.^$|?*+()[]{}-" else c for c in text)


def _opened_by(trigger: str, rest: str, choice: ToolChoice, tokenizer: Tokenizer, answer: str | None) -> str:
    """Grammar for replies made of calls that start with ``trigger`` then ``rest``. With ``auto`` the reply may
    instead be free text, and free text that writes the trigger commits to a valid call (a lazy match); or,
    when ``response_format`` asks for JSON, the ``answer`` grammar fragment instead of free text."""
    special = _special_token(tokenizer, trigger)
    opener = f"<[{special}]>" if special is not None else _lark_literal(trigger)
    if choice.mode != "auto":
        return f"%llguidance {{}}\nstart: {opener} {rest}\n"
    if answer is not None:
        return f"%llguidance {{}}\nstart: {answer} | {opener} {rest}\n"
    if special is not None:  # free text can never produce a control token
        return f"%llguidance {{}}\nstart: TEXT | TEXT? {opener} {rest}\nTEXT: /(.|\\n)+/\n"
    return (f"%llguidance {{}}\nstart: TEXT | prose {rest}\nprose[lazy]: /(.|\\n)*{_regex_escape(trigger)}/\n"
            f"TEXT: /(.|\\n)*/\n")


def tool_grammar(syntax: str, tools: tuple[ToolSpec, ...], choice: ToolChoice, parallel: bool,
                 tokenizer: Tokenizer, answer_schema: dict[str, Any] | None = None) -> str | None:
    """llguidance (lark) grammar for the reply; None when the reply is free (``none``). ``answer_schema``:
    with ``auto``, a reply that calls nothing must be JSON matching it (``response_format``)."""
    if choice.mode == "none":
        return None
    answer = None
    if answer_schema is not None and choice.mode == "auto":
        answer = f'%json {json.dumps({**bounded_numbers(answer_schema), "x-guidance": {"whitespace_flexible": False}})}'
        if syntax == "llama3":
            raise ChatError("response_format JSON cannot be combined with tool_choice 'auto' for this model: its "
                            "tool calls are bare JSON objects too", param="response_format", code="unsupported_parameter",
                            status=422)
    chosen = tuple(t for t in tools if t.name == choice.name) if choice.mode == "named" else tools
    many = parallel and choice.mode != "named"
    if syntax in ("hermes", "generic"):
        body = f'"\\n" %json {json.dumps(bounded_numbers(_call_schema(chosen, "arguments")))} "\\n</tool_call>"'
        more = f' ("\\n{TRIGGERS[syntax]}" ' + body + ")*" if many else ""
        return _opened_by(TRIGGERS[syntax], body + more, choice, tokenizer, answer)
    if syntax == "llama3":
        body = f'%json {json.dumps(bounded_numbers(_call_schema(chosen, "parameters")))}'
        if choice.mode == "auto":
            return f"%llguidance {{}}\nstart: TEXT | call\ncall: {body}\nTEXT: /[^{{](.|\\n)*/\n"
        return f"%llguidance {{}}\nstart: {body}\n"
    if syntax == "mistral":
        array = {"type": "array", "items": _call_schema(chosen, "arguments"), "minItems": 1,
                 "x-guidance": {"whitespace_flexible": False}}
        if not many:
            array["maxItems"] = 1
        return _opened_by(TRIGGERS[syntax], f"%json {json.dumps(bounded_numbers(array))}", choice, tokenizer, answer)
    raise ValueError(f"unknown tool syntax {syntax!r}")
