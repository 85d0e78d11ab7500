"""Every documented chat-completions request field through the official SDK: honoured, accepted without
effect, or refused with a 422 naming it; legacy function calling; what every reply carries (refusal: null,
the canonical model id); the 400/422 rule."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_fixtures import TINY_ID, openai_client, serving

HELLO = [{"role": "user", "content": "the heat"}]
GET_TIME = {"name": "get_time", "description": "the time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("fields"), model={"context": 1024}, slots=4, max_len=1024)


@pytest.fixture
def client(server):
    return openai_client(server)


def test_bookkeeping_and_hint_fields_are_accepted_and_change_nothing(client):
    plain = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=6, seed=3)
    decorated = client.chat.completions.create(
        model=TINY_ID, messages=HELLO, max_tokens=6, seed=3, store=False, metadata={"run": "a"},
        service_tier="auto", safety_identifier="user-1", user="u", verbosity="low", modalities=["text"],
        prompt_cache_key="conversation-7", prompt_cache_retention="in-memory", prompt_cache_options={"mode": "implicit"},
        parallel_tool_calls=True)
    assert decorated.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("moderation", {"model": "omni-moderation-latest"}),
])
def test_what_cannot_be_honoured_is_refused_naming_the_field(client, field, value):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2, **{field: value})
    error = info.value.body
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


def test_audio_output_modality_is_refused(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2, modalities=["text", "audio"])
    assert info.value.body["param"] == "modalities.1"


def test_a_field_no_api_has_is_still_a_400(server):
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": TINY_ID, "messages": HELLO, "colour": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "colour"


def test_replies_carry_refusal_null_and_the_canonical_model_id(client, server):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)  # an alias
    assert reply.model == TINY_ID and reply.choices[0].message.refusal is None
    raw = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 2})
    assert raw.json()["choices"][0]["message"]["refusal"] is None
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, stream=True))
    assert {c.model for c in chunks} == {TINY_ID}
    card = httpx.get(server.url + "/v1/models/tiny").json()
    assert card["max_model_len"] == 1024 and card["root"] == TINY_ID and card["aliases"] == ["tiny"]


def test_an_echoed_assistant_message_is_accepted(client):
    first = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=4)
    echoed = first.choices[0].message.model_dump()  # refusal, annotations, audio, function_call: None
    reply = client.chat.completions.create(model=TINY_ID, messages=[*HELLO, echoed, {"role": "user", "content": "ok"}],
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_legacy_functions_are_answered_with_function_call(client, server):
    body = {"model": TINY_ID, "messages": HELLO, "functions": [GET_TIME], "function_call": {"name": "get_time"},
            "max_tokens": 120, "temperature": 0.8}
    # a random model may ramble inside the argument until the budget closes the call ("length"): take the
    # first seed whose call ends on its own (the seed makes it reproducible)
    for seed in range(20):
        reply = client.chat.completions.create(**body, seed=seed)
        if reply.choices[0].finish_reason != "length":
            break
    body["seed"] = seed
    message, finish = reply.choices[0].message, reply.choices[0].finish_reason
    assert finish == "function_call" and message.tool_calls is None and message.content is None
    assert message.function_call.name == "get_time" and "city" in json.loads(message.function_call.arguments)
    streamed = list(client.chat.completions.create(**body, stream=True))
    calls = [c.choices[0].delta.function_call for c in streamed if c.choices and c.choices[0].delta.function_call]
    assert calls[0].name == "get_time" and all(c.name is None for c in calls[1:])
    assert "".join(c.arguments or "" for c in calls) == message.function_call.arguments
    assert streamed[-1].choices[0].finish_reason == "function_call"
    # the call and its answer come back as history, in the legacy shape
    history = [*HELLO, {"role": "assistant", "content": None, "function_call": message.function_call.model_dump()},
               {"role": "function", "name": "get_time", "content": "12:00"}]
    follow = client.chat.completions.create(model=TINY_ID, messages=history, functions=[GET_TIME], max_tokens=3)
    assert follow.choices[0].finish_reason in ("stop", "length", "function_call")


@pytest.mark.parametrize("body, status", [
    ({"functions": [GET_TIME], "tools": [{"type": "function", "function": GET_TIME}]}, 422),
    ({"function_call": "auto"}, 422),
    ({"functions": "get_time"}, 400),
    ({"messages": [*HELLO, {"role": "function", "name": "get_time", "content": "12:00"}]}, 422),
])
def test_legacy_function_errors(server, body, status):
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": TINY_ID, "messages": HELLO, **body})
    assert response.status_code == status, response.text


def test_tokenize_and_detokenize_in_both_shapes(server):
    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731
    plain = post("/tokenize", {"content": "the heat", "with_pieces": True}).json()
    ids = [t["id"] for t in plain["tokens"]]
    assert plain["count"] == len(ids) > 0 and "".join(t["piece"] for t in plain["tokens"]) == "the heat"
    assert post("/tokenize", {"model": "tiny", "prompt": "the heat"}).json()["tokens"] == ids  # vLLM's shape
    assert post("/detokenize", {"tokens": ids}).json() == {"content": "the heat", "prompt": "the heat"}
    chat = post("/tokenize", {"model": TINY_ID, "messages": HELLO}).json()
    reply = httpx.post(server.url + "/v1/chat/completions",
                       json={"model": TINY_ID, "messages": HELLO, "max_tokens": 1}).json()
    assert chat["count"] == reply["usage"]["prompt_tokens"] and chat["max_model_len"] == 1024
    assert post("/tokenize", {"content": "a", "prompt": "b"}).status_code == 400
    assert post("/tokenize", {"model": "nope", "content": "a"}).status_code == 404
    bad = post("/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "tokens"


def test_cors_is_off_by_default_and_answers_preflight_when_on(server, tmp_path):
    assert "access-control-allow-origin" not in httpx.get(server.url + "/v1/models").headers
    from flaxchat.serve.app import ServerSettings
    from tests.server_fixtures import start_tiny_server

    allowed = "http://localhost:5173"
    cors_server, engine = start_tiny_server(tmp_path, ServerSettings(cors_allow_origins=(allowed,)))
    try:
        preflight = httpx.options(cors_server.url + "/v1/chat/completions", headers={
            "Origin": allowed, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "POST" in preflight.headers["access-control-allow-methods"]
        reply = httpx.post(cors_server.url + "/v1/chat/completions", headers={"Origin": allowed},
                           json={"model": TINY_ID, "messages": HELLO, "max_tokens": 2})
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == allowed
        other = httpx.get(cors_server.url + "/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        cors_server.stop()
        engine.stop()


def test_n_beyond_the_slots_waits_for_slots_and_keeps_each_choice_s_bits(client, server):
    # the server has 4 slots: 10 choices run as groups of 4, 4 and 2, one stream of events
    many = client.chat.completions.create(model=TINY_ID, messages=HELLO, n=10, max_tokens=5, seed=77, logprobs=True)
    assert sorted(c.index for c in many.choices) == list(range(10))
    one = client.chat.completions.create(model=TINY_ID, messages=HELLO, n=1, max_tokens=5, seed=77, logprobs=True)
    first = next(c for c in many.choices if c.index == 0)
    assert first.message.content == one.choices[0].message.content
    assert [e.logprob for e in first.logprobs.content] == [e.logprob for e in one.choices[0].logprobs.content]
    streamed = list(client.chat.completions.create(model=TINY_ID, messages=HELLO, n=10, max_tokens=5, seed=77,
                                                   stream=True))
    for choice in many.choices:
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == choice.index)
        assert text == choice.message.content
    too_many = httpx.post(server.url + "/v1/chat/completions", json={"model": TINY_ID, "messages": HELLO, "n": 129})
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "n"


def test_openapi_document_describes_what_the_server_validates(server):
    import jsonschema

    document = httpx.get(server.url + "/openapi.json").json()
    assert document["openapi"].startswith("3.1") and {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize",
                                                        "/detokenize"} <= set(document["paths"])
    schema = {"$ref": "#/components/schemas/ChatCompletionRequest", "components": document["components"]}
    jsonschema.validate({"model": TINY_ID, "messages": HELLO, "n": 2, "store": False}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": TINY_ID, "messages": HELLO, "colour": 1}, schema)  # the server's 400 too
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "422", "503"} <= set(responses)
    # what the server sends is what the document says it sends
    def check(instance: dict, name: str) -> None:
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": document["components"]})

    # seeded: an unseeded draw from the tiny random model sometimes ends at its first token (too few chunks)
    body = {"model": TINY_ID, "messages": HELLO, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "seed": 3}
    check(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json(), "ChatCompletion")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as events:
        chunks = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: {")]
    assert len(chunks) > 2
    for chunk in chunks:
        check(chunk, "ChatCompletionChunk")
    check(httpx.post(server.url + "/v1/completions", json={"model": TINY_ID, "prompt": "hi", "max_tokens": 3,
                                                           "logprobs": 1, "echo": True}, timeout=60).json(),
          "TextCompletion")
    check(httpx.post(server.url + "/v1/chat/completions", json={"model": TINY_ID}, timeout=60).json(), "ErrorResponse")


def test_content_filter_ends_a_reply_before_the_match_and_refuses_a_matching_prompt(tmp_path):
    import regex

    from flaxchat.chat.request import ServedModel
    from flaxchat.sampling.params import SamplingParams
    from flaxchat.serve.app import create_app
    from flaxchat.serve.server import BackgroundServer
    from tests.engine_fixtures import tiny_engine
    from tests.gguf_writer import CHAT_TEMPLATE

    engine = tiny_engine(tmp_path, slots=2, max_len=256)
    try:
        ids = engine.tokenizer.encode(ServedModel(TINY_ID, engine, engine.tokenizer, CHAT_TEMPLATE, "fp").format
                                      .render(HELLO))
        params = SamplingParams(max_tokens=40, temperature=0.9, seed=5)  # what the HTTP request below asks for
        text = "".join(e.text for e in engine.submit(ids, params).result()[0])
        start = next(i for i in range(8, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
        blocked = text[start:start + 3]  # three characters from the middle of the reply the seed gives
        first = text.find(blocked)
        served = ServedModel(TINY_ID, engine, engine.tokenizer, CHAT_TEMPLATE, "fp", content_filter=(regex.escape(blocked),))
        server = BackgroundServer(create_app(served)).start()
        try:
            client = openai_client(server)
            body = dict(model=TINY_ID, messages=HELLO, max_tokens=40, temperature=0.9, seed=5)
            reply = client.chat.completions.create(**body)
            assert reply.choices[0].finish_reason == "content_filter"
            assert reply.choices[0].message.content == text[:first]
            shown = ""
            for chunk in client.chat.completions.create(**body, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    shown += chunk.choices[0].delta.content
                    assert text[:first].startswith(shown)  # never any part of the match
            assert shown == text[:first]
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "x" + blocked}])
            assert info.value.body["code"] == "content_filter"
            metrics = httpx.get(server.url + "/metrics").text
            assert "flaxchat_content_filtered_prompts_total 1.0" in metrics
            assert "flaxchat_content_filtered_replies_total 2.0" in metrics
        finally:
            server.stop()
    finally:
        engine.stop()


def test_content_filter_file_lines(tmp_path):
    import regex

    from flaxchat.chat.request import load_content_filter

    path = tmp_path / "filter.txt"
    path.write_text("# comments and blank lines are skipped\n\nfree (as in beer)\nre:pass\\s*word\n")
    literal, expression = load_content_filter(str(path))
    assert regex.search(literal, "it is free (as in beer)!") and not regex.search(literal, "free as in beer")
    assert regex.search(expression, "pass  word")
    path.write_text("re:(unclosed\n")
    with pytest.raises(ValueError, match="bad content filter pattern"):
        load_content_filter(str(path))
