"""Client libraries nobody here wrote, against the served tiny model: LangChain's ``ChatOpenAI`` (invoke,
stream, ``bind_tools``, ``with_structured_output`` by json_schema, function calling and JSON mode) and LiteLLM
(completion, streaming, tools). They send what they send; the server has to understand it."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server_fixtures import TINY_ID, serving

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import

import langchain_openai  # noqa: E402  (dev dependencies: a missing one is a failure, not a skip)
import litellm  # noqa: E402


class Trip(BaseModel):
    """A short trip."""

    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=9)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("clients"), model={"context": 1024}, slots=4, max_len=1024)


@pytest.fixture
def chat(server):
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=TINY_ID, max_tokens=200,
                                       temperature=0.7, seed=5, max_retries=0)


def test_langchain_invoke_and_stream_agree(chat):
    whole = chat.invoke("Tell me about the heat")
    assert isinstance(whole.content, str) and whole.response_metadata["model_name"] == TINY_ID
    streamed = "".join(chunk.content for chunk in chat.stream("Tell me about the heat"))
    assert streamed == whole.content


def test_langchain_bind_tools_gives_a_call_with_valid_arguments(chat):
    reply = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"]
    assert isinstance(reply.tool_calls[0]["args"]["city"], str) and reply.tool_calls[0]["id"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_fills_the_model(chat, method):
    trip = chat.with_structured_output(Trip, method=method).invoke("Plan a trip")
    assert isinstance(trip, Trip) and 1 <= trip.days <= 9


def test_langchain_json_mode_gives_a_json_object(chat):
    schema = Trip.model_json_schema()  # JSON mode keeps the output JSON; it does not hold it to a schema
    parsed = chat.with_structured_output(schema, method="json_mode").invoke("Plan a trip, in JSON")
    assert isinstance(parsed, dict)


def _litellm_args(server) -> dict:
    return dict(model=f"openai/{TINY_ID}", api_base=server.url + "/v1", api_key="unused", max_tokens=200,
                temperature=0.7, seed=5, num_retries=0)


def test_litellm_completion_stream_and_tools(server):
    messages = [{"role": "user", "content": "Tell me about the heat"}]
    whole = litellm.completion(messages=messages, **_litellm_args(server))
    text = whole.choices[0].message.content
    assert isinstance(text, str) and whole.usage.completion_tokens > 0
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       litellm.completion(messages=messages, stream=True, **_litellm_args(server)))
    assert streamed == text
    called = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
                                tool_choice="required", **_litellm_args(server))
    calls = called.choices[0].message.tool_calls
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"])
