"""`flaxchat serve` as a user runs it, with the default model, talked to by the openai client."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

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
        [sys.executable, "-m", "serve.cli", "serve", "--port", str(port), "--slots", "4", "--max-len", "1024"],
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


def test_json_modes_with_the_default_model(served):
    import json

    import jsonschema

    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "country"], "additionalProperties": False}
    question = [{"role": "user", "content": "Return the city and country of Brussels as JSON."}]
    for seed in range(5):
        reply = client.chat.completions.create(
            model="smollm2", messages=question, seed=seed, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        reply = client.chat.completions.create(model="smollm2", messages=question, seed=seed, max_tokens=200,
                                               response_format={"type": "json_object"})
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_sigterm_lets_in_flight_requests_finish(served):  # keep last: it stops the server
    url, process = served
    result = {}

    def long_request():
        result["response"] = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 60})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.time() + 30
    while httpx.get(url + "/health").json()["busy_slots"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result["response"].status_code == 200
    assert result["response"].json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert process.wait(60) == 0
    log = process.stdout.read()
    assert "warm-up took" in log and f"serving smollm2-135m-instruct at {url}/v1" in log and "stopped" in log
