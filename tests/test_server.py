"""The OpenAI-compatible server, exercised with the official openai client and raw httpx."""

import json

import httpx
import openai
import pytest

from serve.app import ServerSettings
from tests.server_fixtures import TINY_ID, start_tiny_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server, engine = start_tiny_server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()
    engine.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


HELLO = [{"role": "user", "content": "the heat"}]


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
    ({"model": TINY_ID, "messages": [{"role": "tool", "content": "x"}]}, 422, "invalid_parameter", "messages.0"),
    ({"model": TINY_ID, "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "unsupported_parameter", "tools"),
    ({"model": TINY_ID, "messages": HELLO, "response_format": {"type": "json_object"}}, 400, "unsupported_parameter",
     "response_format"),
    ({"model": TINY_ID, "messages": HELLO, "reasoning_effort": "low"}, 400, "unsupported_parameter", "reasoning_effort"),
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
    assert "maximum context length is 128" in str(info.value)
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
    engine.fault_hook = lambda step: hold.wait(30) if step == "decode" else None  # keep the slot busy
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
        engine.fault_hook = None
        server.stop()
        engine.stop()
