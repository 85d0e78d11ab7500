"""``POST /v1/responses`` through the official client: whole and streamed (every event validated against the
SDK's types, in the documented order), tools with a round trip, ``text.format`` json_schema, and what a
stateless server refuses."""

from __future__ import annotations

import json
import typing

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tests.server_fixtures import TINY_ID, openai_client, serving

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}
# each event type's SDK class (the stream event union, keyed by its `type` literal)
EVENT_TYPES = {cls.model_fields["type"].annotation.__args__[0]: cls
               for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}


def _validate_event(event) -> None:
    EVENT_TYPES[event.type].model_validate(event.model_dump(exclude_unset=True))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("responses"), model={"context": 1024}, slots=4, max_len=1024)


@pytest.fixture
def client(server):
    return openai_client(server)


def _raw(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json={"model": TINY_ID, **body}, timeout=60)


def test_a_response_whole_and_streamed_is_the_same_text(client, server):
    body = dict(input="Tell me about the heat", instructions="Be brief.", max_output_tokens=12, temperature=0.8,
                extra_body={"seed": 4})
    whole = client.responses.create(model=TINY_ID, **body)
    raw = _raw(server, input=body["input"], instructions="Be brief.", max_output_tokens=12, temperature=0.8, seed=4)
    Response.model_validate(raw.json(), strict=False)  # every required field, in the SDK's types
    assert raw.json()["output"][0]["content"][0]["text"] == whole.output_text
    assert whole.object == "response" and whole.model == TINY_ID and whole.status in ("completed", "incomplete")
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 12
    if whole.status == "incomplete":
        assert whole.incomplete_details.reason == "max_output_tokens"

    events = list(client.responses.create(model=TINY_ID, stream=True, **body))
    for event in events:
        _validate_event(event)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text

    with client.responses.stream(model=TINY_ID, **body) as stream:  # the SDK's helper checks every event's place
        final = list(stream)[-1]
    assert final.type == f"response.{whole.status}" and final.response.output_text == whole.output_text


def test_a_tool_call_and_its_answer_round_trip(client):
    called = client.responses.create(model=TINY_ID, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                     max_output_tokens=200, extra_body={"seed": 1})
    calls = [item for item in called.output if item.type == "function_call"]
    assert len(calls) >= 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    answered = client.responses.create(
        model=TINY_ID, tools=[WEATHER], max_output_tokens=8, extra_body={"seed": 1},
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 24 C"}],
        tool_choice="none")
    assert [item.type for item in answered.output] == ["message"] and answered.output_text

    streamed = list(client.responses.create(model=TINY_ID, input="Weather in Paris?", tools=[WEATHER],
                                            tool_choice="required", max_output_tokens=200, extra_body={"seed": 1},
                                            stream=True))
    for event in streamed:
        _validate_event(event)
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]


def test_text_format_json_schema_gives_valid_json(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    reply = client.responses.create(model=TINY_ID, input="Plan a trip", max_output_tokens=200, extra_body={"seed": 2},
                                    text={"format": {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), schema)
    assert reply.text.format.type == "json_schema"


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
])
def test_what_a_stateless_text_server_cannot_do_is_refused(client, extra, param):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.responses.create(model=TINY_ID, input="hi", max_output_tokens=4, **extra)
    assert info.value.body["param"] == param and info.value.body["code"] == "unsupported_parameter"


def test_malformed_input_is_a_400(server):
    reply = _raw(server, input=[{"type": "function_call_output"}])
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("input")
