"""The OpenAI-compatible server, exercised with the official openai client and raw httpx."""

import json

import httpx
import openai
import pytest

from flaxchat.serve.app import ServerSettings
from tests.server_fixtures import TINY_ID, openai_client, serving, start_tiny_server
from tests.step_hooks import set_step_hook


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("server"), max_len=256)


@pytest.fixture
def client(server):
    return openai_client(server)


HELLO = [{"role": "user", "content": "the heat"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}}


def test_non_streaming_shape(client):
    reply = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=8, seed=3)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == TINY_ID and reply.system_fingerprint == "fp_test"
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert 1 <= reply.usage.completion_tokens <= 8


def test_seeded_reproducible_and_stream_equals_non_stream(client):
    args = dict(model=TINY_ID, messages=HELLO, max_tokens=16, seed=11, temperature=0.9, top_p=0.9)
    first = client.chat.completions.create(**args)
    second = client.chat.completions.create(**args)
    assert first.choices[0].message.content == second.choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [first.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == first.usage.completion_tokens


def test_n_and_logprobs(client):
    reply = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=6, seed=5, n=3,
                                           logprobs=True, top_logprobs=4, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        content = choice.logprobs.content
        assert content and all(len(e.top_logprobs) == 4 for e in content)
        assert all(e.logprob <= 0 for e in content)
        assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content).startswith(
            choice.message.content[:1])


def test_alias_path_and_models(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_ID, "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    response = httpx.post(server.url + "/api/v1/chat/completions", json={"model": "tiny", "messages": HELLO,
                                                                         "max_tokens": 2})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _post(server, body, **kwargs):
    return httpx.post(server.url + "/v1/chat/completions", **({"json": body} if body is not None else {}), **kwargs)


def _assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("body,status,code,param", [
    ({"model": TINY_ID}, 400, "missing_required_parameter", "messages"),
    ({"model": TINY_ID, "messages": HELLO, "temperature": 3}, 422, "invalid_parameter", "temperature"),
    ({"model": TINY_ID, "messages": HELLO, "top_logprobs": 21, "logprobs": True}, 422, "invalid_parameter", "top_logprobs"),
    ({"model": TINY_ID, "messages": HELLO, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"model": TINY_ID, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_parameter", "stop"),
    ({"model": TINY_ID, "messages": HELLO, "frobnicate": 1}, 400, "unknown_parameter", "frobnicate"),
    ({"model": TINY_ID, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages.0"),
    ({"model": TINY_ID, "messages": HELLO + [{"role": "tool", "content": "x", "tool_call_id": "call_1"}]}, 422,
     "invalid_value", "messages[1].tool_call_id"),
    ({"model": TINY_ID, "messages": HELLO + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "f", "arguments": "{not json"}}]}]}, 422, "invalid_value",
     "messages[1].tool_calls[0].function.arguments"),
    ({"model": TINY_ID, "messages": HELLO, "tool_choice": "required"}, 422, "invalid_value", "tool_choice"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, 422, "invalid_value",
     "tool_choice"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": 3}, 400, "invalid_value",
     "tool_choice"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
      "function": {"name": "get_time"}}}, 422, "invalid_value", "tool_choice.function.name"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 422,
     "invalid_value", "tools[0].function.name"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "description": 3}}]},
     400, "invalid_value", "tools[0].function.description"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
      "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"}, 422,
     "invalid_json_schema", "tools"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [WEATHER_TOOL], "response_format": {"type": "json_schema",
      "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 422, "invalid_json_schema", "tools"),
    ({"model": TINY_ID, "messages": HELLO, "reasoning_effort": "extreme"}, 422, "invalid_value", "reasoning_effort"),
    ({"model": TINY_ID, "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, 422,
     "invalid_json_schema", "response_format"),
    ({"model": TINY_ID, "messages": HELLO, "response_format": {"type": "json_schema"}}, 422, "invalid_parameter",
     "response_format"),
    ({"model": TINY_ID, "messages": HELLO, "response_format": {"type": "yaml"}}, 422, "invalid_parameter",
     "response_format.type"),
    ({"model": TINY_ID, "messages": HELLO, "logit_bias": {"99999": 5}}, 422, "invalid_parameter", "logit_bias"),
    ({"model": "nope", "messages": HELLO}, 404, "model_not_found", "model"),
    ({"model": TINY_ID, "messages": HELLO, "max_tokens": 500}, 400, "context_length_exceeded", "max_tokens"),
])
def test_errors_then_healthy(server, client, body, status, code, param):
    error = _assert_error(_post(server, body), status, code)
    assert error["param"] == param
    assert client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices


def test_malformed_requests(server, client):
    _assert_error(_post(server, None, content=b"{not json", headers={"Content-Type": "application/json"}), 400,
                  "invalid_json")
    _assert_error(_post(server, None, content=b"{}", headers={"Content-Type": "text/plain"}), 400,
                  "invalid_content_type")
    _assert_error(_post(server, None, content=json.dumps([1]).encode(),
                        headers={"Content-Type": "application/json"}), 400, "invalid_json")
    _assert_error(httpx.get(server.url + "/v1/nowhere"), 404)
    _assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    long = "x" * (5 * 1024 * 1024)
    _assert_error(_post(server, {"model": TINY_ID, "messages": [{"role": "user", "content": long}]}), 413)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "y " * 400}])
    assert "maximum context length is 256" in str(info.value)
    assert client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices


def test_api_keys(tmp_path):
    server, engine = start_tiny_server(tmp_path, ServerSettings(api_keys=frozenset({"sk-good"})))
    try:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-bad", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2)
        _assert_error(_post(server, {"model": TINY_ID, "messages": HELLO}), 401, "invalid_api_key")
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-good", max_retries=0)
        assert good.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices
        assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    finally:
        server.stop()
        engine.stop()


def test_queue_full_is_503_with_retry_after(tmp_path):
    import threading
    import time

    server, engine = start_tiny_server(tmp_path, slots=1, queue_size=1)
    hold = threading.Event()
    set_step_hook(engine, lambda step: hold.wait(30) if step == "decode" else None)  # keep the slot busy
    try:
        body = {"model": TINY_ID, "messages": HELLO, "max_tokens": 4}
        results = []
        clients = [threading.Thread(target=lambda: results.append(_post(server, body, timeout=60))) for _ in range(2)]
        clients[0].start()
        deadline = time.time() + 10
        while engine.busy_slots == 0 and time.time() < deadline:
            time.sleep(0.01)
        clients[1].start()
        while engine.queue_depth == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.busy_slots == 1 and engine.queue_depth == 1
        response = _post(server, body)
        _assert_error(response, 503, "server_overloaded")
        assert response.headers["Retry-After"] == "1"
        hold.set()
        for thread in clients:
            thread.join(30)
        assert [r.status_code for r in results] == [200, 200]
    finally:
        hold.set()
        set_step_hook(engine, None)
        server.stop()
        engine.stop()


def _sse(server, body):
    """Raw SSE: the parsed chunks and whether the stream ended with [DONE]."""
    chunks, done = [], False
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
            else:
                chunks.append(json.loads(line[6:]))
    return chunks, done


def test_shapes_validate_against_openai_schemas(server):
    import jsonschema

    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from tests.openai_schemas import CHAT_COMPLETION, CHAT_COMPLETION_CHUNK, ERROR

    body = {"model": TINY_ID, "messages": HELLO, "max_tokens": 6, "n": 2, "logprobs": True, "top_logprobs": 3,
            "seed": 9, "stop": "zz"}
    reply = _post(server, body).json()
    jsonschema.validate(reply, CHAT_COMPLETION)
    ChatCompletion.model_validate(reply)  # and the official SDK's types, generated from OpenAI's own schema
    chunks, done = _sse(server, {**body, "stream_options": {"include_usage": True}})
    assert done
    for chunk in chunks:
        jsonschema.validate(chunk, CHAT_COMPLETION_CHUNK)
        ChatCompletionChunk.model_validate(chunk)
    for i in range(2):  # per choice: the concatenated stream equals the whole reply, logprobs too
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == i)
        assert text == reply["choices"][i]["message"]["content"]
        tokens = [e["token"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i
                  and c["choices"][0].get("logprobs") for e in c["choices"][0]["logprobs"]["content"]]
        assert tokens == [e["token"] for e in reply["choices"][i]["logprobs"]["content"]]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # (the second request may hit the prefix cache)
    assert [chunks[-1]["usage"][k] for k in counts] == [reply["usage"][k] for k in counts] and chunks[-1]["choices"] == []
    jsonschema.validate(_post(server, {"model": TINY_ID}).json(), ERROR)


def test_client_disconnect_cancels_its_request(server):
    import time

    engine_busy = lambda: httpx.get(server.url + "/health").json()["busy_slots"]  # noqa: E731
    set_step_hook(server.engine, lambda step: time.sleep(0.05) if step == "decode" else None)  # 100 tokens: >= 5 s
    body = {"model": TINY_ID, "messages": HELLO, "max_tokens": 100, "stream": True,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines)
        next(lines)
    disconnected = time.time()
    while engine_busy() and time.time() < disconnected + 10:
        time.sleep(0.02)
    set_step_hook(server.engine, None)
    assert engine_busy() == 0
    assert time.time() - disconnected < 2.5  # freed long before the 100 tokens could have been generated


def test_32_concurrent_clients_and_the_seeded_one_matches_its_solo_run(server, client):
    import concurrent.futures

    seeded = dict(model=TINY_ID, messages=[{"role": "user", "content": "the hero"}], max_tokens=12, seed=2024,
                  temperature=0.8, logprobs=True)
    solo = client.chat.completions.create(**seeded)

    def call(i):
        if i == 16:
            return client.chat.completions.create(**seeded)
        kwargs = dict(model=TINY_ID, messages=[{"role": "user", "content": "the " * (i % 7 + 1)}],
                      max_tokens=4 + i % 9, seed=i, temperature=1.0 if i % 2 else 0.0)
        if i % 3 == 0:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kwargs, stream=True) if c.choices)
        return client.chat.completions.create(**kwargs)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    assert len(results) == 32 and all(r is not None for r in results)
    together = results[16]
    assert together.choices[0].message.content == solo.choices[0].message.content
    assert [(e.token, e.logprob) for e in together.choices[0].logprobs.content] == \
        [(e.token, e.logprob) for e in solo.choices[0].logprobs.content]


def test_generation_failure_is_500_then_healthy(server, client):
    def broken(step):
        if step == "prefill":
            raise RuntimeError("injected device failure")

    set_step_hook(server.engine, broken)
    try:
        error = _assert_error(_post(server, {"model": TINY_ID, "messages": HELLO, "max_tokens": 3}), 500,
                              "internal_error")
    finally:
        set_step_hook(server.engine, None)
    assert error["type"] == "server_error" and "Traceback" not in error["message"]
    assert client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices


def test_unexpected_exception_is_500_with_request_id_and_no_traceback(server, client, monkeypatch):
    import flaxchat.serve.app

    def explode(*args, **kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(flaxchat.serve.app, "prepare", explode)
    error = _assert_error(_post(server, {"model": TINY_ID, "messages": HELLO}), 500, "internal_error")
    assert "request id req_" in error["message"] and "secret" not in error["message"]
    monkeypatch.undo()
    assert client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices


def test_assistant_tool_calls_and_tool_messages_are_accepted(client):
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "tomorrow?"}]},
    ]
    assert client.chat.completions.create(model=TINY_ID, messages=messages, max_tokens=2).choices


def test_every_sampling_parameter_is_honoured(client, server):
    no_eos = {"0": -100, "1": -100, "2": -100}
    base = dict(model=TINY_ID, messages=HELLO, logit_bias=no_eos)

    def text(**kwargs):
        reply = client.chat.completions.create(**{**base, **kwargs})
        return reply.choices[0].message.content, reply

    greedy, _ = text(max_tokens=16, temperature=0)
    # top_k=1, min_p=1 and top_p=0 each leave only the most likely token, whatever the temperature
    assert text(max_tokens=16, temperature=1.5, seed=1, extra_body={"top_k": 1})[0] == greedy
    assert text(max_tokens=16, temperature=1.5, seed=1, extra_body={"min_p": 1.0})[0] == greedy
    assert text(max_tokens=16, temperature=1.5, seed=1, top_p=0.0)[0] == greedy
    # penalties change the greedy path of a model that repeats itself
    assert text(max_tokens=16, temperature=0, frequency_penalty=2.0)[0] != greedy
    assert text(max_tokens=16, temperature=0, presence_penalty=2.0)[0] != greedy
    assert text(max_tokens=16, temperature=0, extra_body={"repetition_penalty": 5.0})[0] != greedy
    # logit_bias can force a token; max_completion_tokens caps the reply
    forced, reply = text(max_completion_tokens=3, temperature=1.0, seed=2, logit_bias={**no_eos, "77": 100})
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    assert forced == server.engine.tokenizer.decode([77, 77, 77])
    # stop strings cut the text and end with finish_reason stop
    stop = greedy[2:4]
    cut, reply = text(max_tokens=16, temperature=0, stop=[stop, "never-appears"])
    assert cut == greedy[: greedy.find(stop)] and reply.choices[0].finish_reason == "stop"
    # different seeds differ; user is accepted
    assert text(max_tokens=16, temperature=1.0, seed=1)[0] != text(max_tokens=16, temperature=1.0, seed=2)[0]
    assert text(max_tokens=2, user="alice")[0] is not None


def test_rate_limit_429_and_token_budget_402(tmp_path):
    settings = ServerSettings(api_keys=frozenset({"sk-a", "sk-b", "sk-small"}), rate_limit_per_minute=2,
                              token_budgets={"sk-small": 50})
    server, engine = start_tiny_server(tmp_path, settings)
    try:
        def as_key(key):
            return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

        a = as_key("sk-a")
        for _ in range(2):
            assert a.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices
        response = _post(server, {"model": TINY_ID, "messages": HELLO}, headers={"Authorization": "Bearer sk-a"})
        _assert_error(response, 429, "rate_limit_exceeded")
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert as_key("sk-b").chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices
        small = as_key("sk-small")
        spent, refused = 0, None
        while refused is None:  # each request reserves prompt + max_tokens; a reply spends what it used
            try:
                spent += small.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=12).usage.total_tokens
            except openai.APIStatusError as error:
                refused = error
        assert refused.status_code == 402 and refused.body["code"] == "insufficient_quota"
        assert 0 < spent <= 50  # (a worst case of ~32 tokens fits once in 50; the second is refused up front)
        assert as_key("sk-b").chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=2).choices
    finally:
        server.stop()
        engine.stop()


def test_metrics(server, client):
    client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=3)
    client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=8, seed=3,  # noise: cut and closed
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "s", "schema": {"type": "object", "properties": {"s": {"type": "string"}},
                                                               "required": ["s"]}}})
    _post(server, {"model": "nope", "messages": HELLO})
    text = httpx.get(server.url + "/metrics").text
    assert 'flaxchat_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'flaxchat_http_requests_total{route="/v1/chat/completions",status="404"}' in text
    assert "flaxchat_request_seconds_count" in text and "flaxchat_busy_slots" in text
    assert "flaxchat_prefix_cache_reply_blocks_total" in text
    generated = float(next(line for line in text.splitlines() if line.startswith("flaxchat_generated_tokens_total"))
                      .split()[-1])
    assert generated >= 3

    def value(name):
        return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])

    assert value("flaxchat_guided_choices_total") >= 1 and value("flaxchat_closed_by_budget_total") >= 1
    assert value("flaxchat_mask_seconds_total") > 0


def test_requests_after_the_engine_stopped_get_503(tmp_path):
    server, engine = start_tiny_server(tmp_path)
    try:
        engine.stop()
        response = _post(server, {"model": TINY_ID, "messages": HELLO, "max_tokens": 2})
        _assert_error(response, 503, "server_shutting_down")
        assert response.headers["Retry-After"] == "1"
    finally:
        server.stop()


def test_response_format_json_schema_and_json_object(client):
    import jsonschema

    from tests.test_constraints import SCHEMA

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        reply = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=90, seed=seed,
                                               response_format=fmt)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    args = dict(model=TINY_ID, messages=HELLO, max_tokens=90, seed=3, response_format=fmt)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == client.chat.completions.create(**args).choices[0].message.content
    for seed in range(10):
        reply = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=90, seed=seed,
                                               response_format={"type": "json_object"})
        text = reply.choices[0].message.content
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reply.choices[0].finish_reason == "length" and text.startswith("{")


def test_a_repeated_long_prompt_reports_cached_tokens_and_the_same_reply(server, client):
    """The second request with the same long system prompt takes it from the prefix cache: usage says how
    many prompt tokens were cached (as OpenAI reports them), /metrics counts the hits, and the seeded reply
    (streamed and not) is the one the cold request got."""
    def metric(name):
        text = httpx.get(server.url + "/metrics").text
        return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])

    hits_before = metric("flaxchat_prefix_cache_hit_tokens_total")
    messages = [{"role": "system", "content": "the heat of the river stone " * 12},
                {"role": "user", "content": "the heat"}]
    settings = dict(model=TINY_ID, messages=messages, max_tokens=8, seed=11, temperature=0.8, logprobs=True)
    cold = client.chat.completions.create(**settings)
    warm = client.chat.completions.create(**settings)
    # Cold, only the chat template's first tokens can be shared with this module's earlier prompts; warm, all
    # of the prompt but its last token (whose logits start the reply) comes from the cache.
    assert cold.usage.prompt_tokens > 32 and cold.usage.prompt_tokens_details.cached_tokens < 16
    assert warm.usage.prompt_tokens_details.cached_tokens == cold.usage.prompt_tokens - 1
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert [t.logprob for t in warm.choices[0].logprobs.content] == [t.logprob for t in cold.choices[0].logprobs.content]
    stream = client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cold.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == warm.usage.prompt_tokens_details.cached_tokens
    assert metric("flaxchat_prefix_cache_hit_tokens_total") - hits_before >= 2 * (cold.usage.prompt_tokens - 16)
    assert metric("flaxchat_prefix_cache_bytes") > 0 and metric("flaxchat_prompt_tokens_total") > 0
