"""Tool calling: call syntaxes read whole and streamed (split anywhere), grammars per syntax and tool_choice,
and end to end through the server with the openai client (generic syntax on a tiny Llama with a ChatML
template; hermes syntax on a tiny Qwen3 with the Qwen3 template)."""

import json

import jsonschema
import llguidance
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxchat.sampling.constraints import ll_tokenizer
from flaxchat.chat.errors import ChatError
from flaxchat.chat.tool_parsers import ToolCallStream, json_value_end, scan
from flaxchat.chat.tools import ToolChoice, detect_syntax, parse_tools, tool_grammar
from tests.engine_fixtures import tiny_model
from tests.server_fixtures import TINY_ID, start_tiny_server
from tests.test_reasoning import QWEN3_TEMPLATE, TINY_QWEN3

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "unit": {"enum": ["C", "F"]}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}, "24h": {"type": "boolean"}},
    "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# (syntax, reply text, expected content, expected [(name, arguments)])
REPLIES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
               '</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{"zone":"a\\"}b"}}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone":"a\\"}b"}')]),
    ("hermes", "No tools needed <tool_ here.", "No tools needed <tool_ here.", []),
    ("generic", '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>', None, [("get_time", "{}")]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}', None,
     [("get_weather", '{"city": "Oslo", "days": 1}')]),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', None, [("get_time", '{"zone": "UTC"}')]),
    ("llama3", "Just text {not a call}", "Just text {not a call}", []),
    ("mistral", 'Sure[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", '
                '"arguments": {"city": "Lima", "days": [1]}}]', "Sure",
     [("get_time", '{"zone": "CET"}'), ("get_weather", '{"city": "Lima", "days": [1]}')]),
]


def assemble(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", ()):
            if piece["index"] == len(calls):
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                calls.append([piece["function"]["name"], ""])
            calls[piece["index"]][1] += piece["function"]["arguments"]
    return (content if content or not calls else None), [tuple(c) for c in calls]


def _ids():
    counter = iter(range(10**6))
    return lambda: f"call_{next(counter)}"


@pytest.mark.parametrize("syntax,text,content,calls", REPLIES)
def test_scan_whole_and_streamed_at_every_split(syntax, text, content, calls):
    final = scan(syntax, text, final=True)
    assert (final.content or None if final.calls else final.content) == content
    assert [(c.name, c.arguments) for c in final.calls] == calls
    for name, arguments in calls:
        json.loads(arguments)
    for i in range(len(text) + 1):
        stream = ToolCallStream(syntax, _ids())
        deltas = stream.push(text[:i]) + stream.push(text[i:]) + stream.finish()
        assert assemble(deltas) == (content, calls), i
    stream = ToolCallStream(syntax, _ids())
    deltas = [d for ch in text for d in stream.push(ch)] + stream.finish()
    assert assemble(deltas) == (content, calls)
    names_first = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert all(p["function"]["arguments"] == "" for p in names_first)  # id and name come before arguments


def test_json_value_end():
    text = '{"a": [1, "}]"], "b": {"c": "\\""}} tail'
    assert text[: json_value_end(text, 0)] == '{"a": [1, "}]"], "b": {"c": "\\""}}'
    assert json_value_end('{"a": [1, 2', 0) is None
    assert json_value_end("  12,", 0) == 4 and json_value_end("12", 0) is None


def test_detect_syntax():
    assert detect_syntax(QWEN3_TEMPLATE) == "hermes"
    assert detect_syntax("{{ messages }}") == "generic"
    assert detect_syntax("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") == "mistral"
    assert detect_syntax("{% if tools %}ipython{% endif %}<|python_tag|>") == "llama3"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tok"))[2]


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, tokenizer.vocab_size), grammar)
    return all(matcher.consume_token(t) for t in tokenizer.encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize("syntax,call,other", [
    ("hermes", '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","days":3}}\n</tool_call>',
     '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome","days":3}}\n</tool_call>'),
    ("llama3", '{"name":"get_weather","parameters":{"city":"Paris","days":3}}',
     '{"name":"get_weather","parameters":{"city":"Paris"}}'),
    ("mistral", '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris","days":3}}]',
     '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris","days":9}}]'),
])
def test_grammars_accept_valid_calls_only(tokenizer, syntax, call, other):
    tools = parse_tools(TOOLS)
    required = tool_grammar(syntax, tools, ToolChoice("required"), True, tokenizer)
    named = tool_grammar(syntax, tools, ToolChoice("named", "get_weather"), True, tokenizer)
    wrong_name = tool_grammar(syntax, tools, ToolChoice("named", "get_time"), True, tokenizer)
    auto = tool_grammar(syntax, tools, ToolChoice("auto"), True, tokenizer)
    assert _accepts(tokenizer, required, call) and _accepts(tokenizer, named, call) and _accepts(tokenizer, auto, call)
    assert not _accepts(tokenizer, wrong_name, call)
    assert not _accepts(tokenizer, required, other)  # arguments break the parameters schema
    assert not _accepts(tokenizer, auto, other)  # once a call is open it is constrained
    assert not _accepts(tokenizer, required, "plain text")
    assert _accepts(tokenizer, auto, "plain text")
    assert tool_grammar(syntax, tools, ToolChoice("none"), True, tokenizer) is None


def test_parallel_calls_follow_parallel_tool_calls(tokenizer):
    tools = parse_tools(TOOLS)
    two = ('<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_call>\n'
           '<tool_call>\n{"name":"get_weather","arguments":{"city":"Lima","days":1}}\n</tool_call>')
    assert _accepts(tokenizer, tool_grammar("hermes", tools, ToolChoice("required"), True, tokenizer), two)
    assert not _accepts(tokenizer, tool_grammar("hermes", tools, ToolChoice("required"), False, tokenizer), two)


# ---- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generic_server(tmp_path_factory):
    server, engine = start_tiny_server(tmp_path_factory.mktemp("tools"), model={"context": 2048}, max_len=2048,
                                       slots=8)
    yield server
    server.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(generic_server):
    return openai.OpenAI(base_url=generic_server.url + "/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "What's the weather in Paris for 3 days?"}]


def _validate_calls(choice, names=None):
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_validate_for_20_seeds(client):
    for seed in range(20):
        reply = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                               seed=seed, max_tokens=400)
        _validate_calls(reply.choices[0])


def test_named_calls_validate_for_20_seeds(client):
    for seed in range(20):
        reply = client.chat.completions.create(
            model=TINY_ID, messages=ASK, tools=TOOLS, seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        _validate_calls(reply.choices[0], {"get_weather"})
        assert len(reply.choices[0].message.tool_calls) == 1


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(5):
        reply = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, seed=seed, max_tokens=200)
        _validate_calls(reply.choices[0])
        assert len(reply.choices[0].message.tool_calls) == 1


def _streamed(client, **request):
    content, calls, finish = {}, {}, {}
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            for piece in choice.delta.tool_calls or ():
                entry = calls.setdefault(choice.index, {}).setdefault(piece.index, {"name": None, "arguments": ""})
                if piece.id:
                    assert entry["name"] is None and piece.function.name  # id and name once, first
                    entry["name"] = piece.function.name
                entry["arguments"] += piece.function.arguments or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return content, calls, finish


def _assert_stream_matches(client, request, whole):
    """The streamed calls of ``request`` (one choice) equal ``whole``'s, and the stream ends with tool_calls."""
    _, calls, finish = _streamed(client, **request)
    assert [calls[0][k] for k in sorted(calls[0])] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.choices[0].message.tool_calls]
    assert finish[0] == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}, "auto"])
def test_streamed_tool_calls_assemble_to_the_non_streamed_reply(client, tool_choice):
    request = dict(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice=tool_choice, seed=11, n=2, max_tokens=300)
    whole = client.chat.completions.create(**request)
    content, calls, finish = _streamed(client, **request)
    for choice in whole.choices:
        expected = [{"name": c.function.name, "arguments": c.function.arguments}
                    for c in choice.message.tool_calls or ()]
        assert [calls.get(choice.index, {})[k] for k in sorted(calls.get(choice.index, {}))] == expected
        assert (content[choice.index] or None) == (choice.message.content or None)
        assert finish[choice.index] == choice.finish_reason


def test_auto_and_none(client):
    for seed in range(3):
        auto = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, seed=seed, max_tokens=40)
        choice = auto.choices[0]
        if choice.message.tool_calls:
            _validate_calls(choice)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content is not None
        none = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice="none",
                                              seed=seed, max_tokens=40)
        assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


def test_auto_with_response_format_answers_json_or_calls(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    kinds = set()
    for seed in range(12):
        choice = client.chat.completions.create(
            model=TINY_ID, messages=ASK, tools=TOOLS, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}).choices[0]
        if choice.message.tool_calls:
            _validate_calls(choice)
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(choice.message.content), schema)
            kinds.add("json")
    assert kinds == {"call", "json"}  # the noise model takes both branches
    required = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                              seed=0, max_tokens=200, response_format={"type": "json_object"})
    _validate_calls(required.choices[0])


def test_tool_results_go_back_into_the_conversation(client):
    first = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=2, max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    follow = client.chat.completions.create(model=TINY_ID, messages=messages, tools=TOOLS, seed=2, max_tokens=10)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_hermes_tool_calls_with_the_qwen3_template(tmp_path):
    server, engine = start_tiny_server(tmp_path, model={**TINY_QWEN3, "context": 2048}, max_len=2048)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for seed in range(5):
            reply = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, seed=seed,
                                                   tool_choice="required", reasoning_effort="minimal", max_tokens=300,
                                                   parallel_tool_calls=False)
            _validate_calls(reply.choices[0])
        request = dict(model=TINY_ID, messages=ASK, tools=TOOLS, seed=1, tool_choice="required", max_tokens=300,
                       reasoning_effort="low", parallel_tool_calls=False)
        whole = client.chat.completions.create(**request)
        _validate_calls(whole.choices[0])
        assert whole.choices[0].message.model_dump()["reasoning_content"]
        _assert_stream_matches(client, request, whole)
    finally:
        server.stop()
        engine.stop()


def test_conversation_rewritten_for_each_syntax():
    from flaxchat.chat.tools import mistral_call_id, template_messages

    call = {"id": "call_abc", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "12:00"}]
    hermes = template_messages(messages, "hermes")
    assert hermes[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}  # dicts, as HF templates want
    mistral = template_messages(messages, "mistral")
    assert mistral[1]["tool_calls"][0]["id"] == mistral[2]["tool_call_id"] == mistral_call_id("call_abc")
    assert len(mistral_call_id("call_abc")) == 9 and mistral_call_id("call_abc").isalnum()
    generic = template_messages(messages, "generic")
    assert generic[1] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_time", "arguments": '
                                                         '{"zone": "UTC"}}\n</tool_call>'}
    assert generic[2] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>"}
    assert messages[1]["tool_calls"][0] is call and call["id"] == "call_abc"  # the request is not modified


# Minimal templates in the style of Llama 3.1 and Mistral (tools in the prompt, the model's own call syntax).
LLAMA3_STYLE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% endfor %}{% if tools %}<|start_header_id|>ipython<|end_header_id|>\n\n{% for t in tools %}"
    "{{ t | tojson }}\n{% endfor %}Reply with {\"name\": ..., \"parameters\": ...} or <|python_tag|>.<|eot_id|>"
    "{% endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL_STYLE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]{% elif m.tool_calls %}"
    "[TOOL_CALLS]{{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template,syntax", [(LLAMA3_STYLE, "llama3"), (MISTRAL_STYLE, "mistral")])
def test_model_syntax_chosen_from_the_template(tmp_path, template, syntax):
    assert detect_syntax(template) == syntax
    server, engine = start_tiny_server(tmp_path, model={"context": 2048, "chat_template": template}, max_len=2048)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for seed in range(5):
            reply = client.chat.completions.create(model=TINY_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                                   parallel_tool_calls=False, seed=seed, max_tokens=300)
            _validate_calls(reply.choices[0])
        request = dict(model=TINY_ID, messages=ASK, tools=TOOLS, seed=4, max_tokens=300,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
        whole = client.chat.completions.create(**request)
        _validate_calls(whole.choices[0], {"get_weather"})
        _assert_stream_matches(client, request, whole)
    finally:
        server.stop()
        engine.stop()


def test_parameters_with_definitions(tokenizer):
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
             "required": ["x", "y"], "additionalProperties": False}
    move = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/point"}}, "required": ["to"],
        "additionalProperties": False, "$defs": {"point": point}}}}
    grammar = tool_grammar("hermes", parse_tools([move, CLOCK]), ToolChoice("required"), True, tokenizer)
    assert _accepts(tokenizer, grammar, '<tool_call>\n{"name":"move","arguments":{"to":{"x":1,"y":2}}}\n</tool_call>')
    assert not _accepts(tokenizer, grammar, '<tool_call>\n{"name":"move","arguments":{"to":{"x":1}}}\n</tool_call>')
    other = {"type": "function", "function": {"name": "jump", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/point"}}, "$defs": {"point": {"type": "string"}}}}}
    with pytest.raises(ChatError, match="define \\$defs/point differently"):
        tool_grammar("hermes", parse_tools([move, other]), ToolChoice("required"), True, tokenizer)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(REPLIES), st.lists(st.integers(0, 200), max_size=10))
def test_any_chunking_assembles_to_the_whole_reply(reply, cuts):
    syntax, text, content, calls = reply
    cuts = sorted({min(c, len(text)) for c in cuts})
    stream = ToolCallStream(syntax, _ids())
    deltas = [d for a, b in zip([0, *cuts], [*cuts, len(text)]) for d in stream.push(text[a:b])] + stream.finish()
    assert assemble(deltas) == (content, calls)
