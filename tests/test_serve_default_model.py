"""`flaxchat serve` as a user runs it, with the default model, talked to by the openai client."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.json_schemas import SCHEMAS

pytestmark = pytest.mark.default_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(default_store):
    port = _free_port()
    env = {**os.environ, "FLAXCHAT_HOME": str(default_store), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flaxchat.cli", "serve", "--port", str(port), "--slots", "8", "--max-len", "1024"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("server did not come up:\n" + process.stdout.read())
    yield url, process
    if process.poll() is None:
        process.kill()


def test_answers_and_streams_the_same_text(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="smollm2", temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    args = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Tell me about owls."}],
                max_tokens=40, seed=7, temperature=0.9)
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == whole and len(whole) > 20


def _client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=600)


def _parallel(function, items):
    with ThreadPoolExecutor(8) as pool:  # as many as the server has slots
        return list(pool.map(function, items))


QUESTION = [{"role": "user", "content": "Describe Brussels (city, country, population) as JSON."}]


def test_json_object_parses_for_50_seeds(served):
    client = _client(served)

    def ask(seed):
        reply = client.chat.completions.create(model="smollm2", messages=QUESTION, seed=seed, max_tokens=150,
                                               response_format={"type": "json_object"})
        return reply.choices[0]

    choices = _parallel(ask, range(50))
    for choice in choices:
        assert isinstance(json.loads(choice.message.content), dict), choice
        assert choice.finish_reason in ("stop", "length")
    # A real model closes its JSON itself about half the time at temperature 1: measured 53-54 of seeds 0-99
    # with both weight modes (24-26 of these 50), so 20 of 50 keeps the check without sitting on the median.
    assert sum(c.finish_reason == "stop" for c in choices) >= 20


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schemas_validate_for_20_seeds(served, name):
    client, schema = _client(served), SCHEMAS[name]

    def ask(seed):
        return client.chat.completions.create(
            model="smollm2", messages=QUESTION, seed=seed, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})

    for reply in _parallel(ask, range(20)):
        assert reply.choices[0].finish_reason in ("stop", "length")
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 40},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a timezone",
                                         "parameters": {"type": "object", "properties": {
                                             "timezone": {"type": "string", "maxLength": 40}},
                                             "required": ["timezone"], "additionalProperties": False}}}
SCHEMA_OF = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_tool_calls_validate_for_20_seeds(served, tool_choice):
    client = _client(served)
    messages = [{"role": "user", "content": "What's the weather in Paris right now?"}]

    def ask(seed):
        return client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME], seed=seed,
                                              tool_choice=tool_choice, max_tokens=150)

    for reply in _parallel(ask, range(20)):
        choice = reply.choices[0]
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert isinstance(tool_choice, str) or call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    streamed = {}
    for chunk in client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME], seed=3,
                                                tool_choice=tool_choice, max_tokens=150, stream=True):
        for piece in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            entry = streamed.setdefault(piece.index, {"name": "", "arguments": ""})
            entry["name"] += piece.function.name or ""
            entry["arguments"] += piece.function.arguments or ""
    whole = ask(3).choices[0].message.tool_calls
    assert [streamed[i] for i in sorted(streamed)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole]


def test_sigterm_lets_in_flight_requests_finish(served):  # keep last: it stops the server
    """SIGTERM under load: the decoding requests finish with their full answers, the queued ones get a 503
    (server_shutting_down, Retry-After) at once instead of waiting out the graceful timeout, no request is
    left without an answer, and the process exits cleanly."""
    url, process = served
    results: dict[int, httpx.Response] = {}

    def request(i: int) -> None:
        results[i] = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "messages": [{"role": "user", "content": f"Write a long story, number {i}."}],
            "max_tokens": 60, "seed": i})

    threads = [threading.Thread(target=request, args=(i,)) for i in range(14)]  # 8 slots: some must wait
    for thread in threads:
        thread.start()
    deadline = time.time() + 30
    while httpx.get(url + "/health").json()["busy_slots"] < 8 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert len(results) == 14
    finished = [r for r in results.values() if r.status_code == 200]
    refused = [r for r in results.values() if r.status_code == 503]
    assert len(finished) + len(refused) == 14 and len(finished) >= 8 and refused
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in finished)
    assert all(r.json()["error"]["code"] == "server_shutting_down" and r.headers.get("retry-after") for r in refused)
    assert process.wait(60) == 0
    log = process.stdout.read()
    assert "warm-up took" in log and f"serving smollm2-135m-instruct at {url}/v1" in log and "stopped" in log
