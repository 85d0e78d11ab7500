"""Hostile requests aimed at the expensive parts (parsing, grammars, tokenizing): each gets a clear 4xx (or a
bounded answer) quickly, and the server answers a healthy request right after."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server_fixtures import TINY_ID, serving

HELLO = [{"role": "user", "content": "hi"}]
BOUND_SECONDS = 15  # generous for a loaded 2-core CI machine; each case takes well under 3 s here


def _schema(schema: dict) -> dict:
    return {"model": TINY_ID, "messages": HELLO, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


BIG_TOOLS = [{"type": "function", "function": {"name": f"f{i}", "parameters": {
    "type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(50)}}}} for i in range(128)]
DEEP = "[" * 100_000 + "]" * 100_000

CASES = {
    # name: (raw body or JSON body, the statuses that are a correct answer, a word the error must contain)
    "deeply nested JSON": ('{"model": "%s", "messages": %s}' % (TINY_ID, DEEP), {400}, "nested"),
    "a lone surrogate in content": ('{"model": "%s", "messages": [{"role": "user", "content": "a\\u0000b\\ud800"}]}'
                                    % TINY_ID, {400}, "Unicode"),
    "a schema nested 200 deep": (_schema(_nested(200)), {422}, "grammar"),
    "an enum of 100,000 values": (_schema({"enum": [f"v{i}" for i in range(100_000)]}), {422}, "too big"),
    # (their definitions alone exceed this context; with room for them, their grammar exceeds llguidance's limit)
    "128 tools with 50 properties each": ({"model": TINY_ID, "messages": HELLO, "max_tokens": 4, "tools": BIG_TOOLS,
                                           "tool_choice": "required"}, {400, 422}, ("context length", "too large")),
    "a pathological pattern": (_schema({"type": "string", "pattern": "(a+)+$"}), {200}, None),
    "a pattern repeating 100,000 times": (_schema({"type": "string", "pattern": "a{100000}"}), {200, 422}, None),
    "logit_bias with 100,000 entries": ({"model": TINY_ID, "messages": HELLO, "max_tokens": 2,
                                         "logit_bias": {str(i): 1 for i in range(100_000)}}, {422}, "vocabulary"),
    "max_tokens 10^9": ({"model": TINY_ID, "messages": HELLO, "max_tokens": 10**9}, {400}, "context length"),
    "a 1 MB message": ({"model": TINY_ID, "messages": [{"role": "user", "content": "a" * 1_000_000}], "max_tokens": 2},
                       {400}, "context length"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("hostile"), slots=2, max_len=256)


def _healthy(server) -> None:
    reply = httpx.post(server.url + "/v1/chat/completions", json={"model": TINY_ID, "messages": HELLO, "max_tokens": 3},
                       timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hostile_request_is_answered_quickly_and_harms_nothing(server, name):
    body, statuses, word = CASES[name]
    started = time.perf_counter()
    if isinstance(body, str):
        reply = httpx.post(server.url + "/v1/chat/completions", content=body.encode(),
                           headers={"Content-Type": "application/json"}, timeout=120)
    else:
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert time.perf_counter() - started < BOUND_SECONDS
    assert reply.status_code in statuses, reply.text[:300]
    if reply.status_code >= 400:
        error = reply.json()["error"]
        words = (word,) if isinstance(word, str) else word
        assert set(error) == {"message", "type", "param", "code"} and any(w in error["message"] for w in words)
        assert "backtrace" not in error["message"] and len(error["message"]) < 500
    _healthy(server)


@pytest.mark.parametrize("path", ["/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/../../etc/passwd",
                                  "/v1/models/%00", "/v1/models/" + "a" * 5000])
def test_model_ids_with_path_tricks_are_not_found(server, path):
    reply = httpx.get(server.url + path, timeout=30)
    assert reply.status_code == 404 and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert "passwd" not in reply.text or "does not exist" in reply.text


class _ThreadKiller(BaseException):
    """What no engine loop iteration survives."""


def test_last_a_dead_engine_thread_turns_health_to_503_and_nothing_hangs(server):
    """(Runs last in this module: it kills the module's engine.) A stream in flight ends with an error event,
    /health says 503, and a new request is refused at once with a 503 instead of waiting forever."""
    import json

    from tests.step_hooks import set_step_hook

    assert httpx.get(server.url + "/health").status_code == 200

    def hook(stage: str) -> None:
        if stage == "decode":
            raise _ThreadKiller()

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": TINY_ID, "messages": HELLO, "max_tokens": 50, "stream": True}) as stream:
        set_step_hook(server.engine, hook)
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert any("error" in json.loads(line[6:]) for line in lines if line != "data: [DONE]")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "engine stopped"
    started = time.perf_counter()
    refused = httpx.post(server.url + "/v1/chat/completions", json={"model": TINY_ID, "messages": HELLO}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
    assert time.perf_counter() - started < 5
