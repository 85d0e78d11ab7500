"""``GET /openapi.json``: the served API described from the models themselves, requests (``chat/protocol.py``,
``chat/responses.py``) and replies (``serve/objects.py``), so the document cannot drift from what the server
validates and sends (fuzzers read it; see issue 14)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from flaxchat import __version__
from flaxchat.chat.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from flaxchat.chat.responses import ResponsesRequest
from flaxchat.serve.objects import ChatCompletion, ChatCompletionChunk, ErrorResponse, TextCompletion

# status -> when (serve/errors.py has the rule)
ERRORS = {"400": "Invalid format: not JSON, a missing field, a wrong type, an unknown field; or the context is exceeded",
          "401": "Missing or wrong API key", "402": "The key's token budget is spent", "404": "Unknown model",
          "413": "Body too large", "422": "Invalid parameters: a well-formed value that cannot be used",
          "429": "Rate limit", "500": "Server error", "503": "Overloaded or shutting down"}
# path -> (request model, response model (None: an object described elsewhere), summary, its stream's event model)
POSTS: dict[str, tuple[type[BaseModel], type[BaseModel] | None, str, type[BaseModel] | None | bool]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletion, "Create a chat completion", ChatCompletionChunk),
    "/v1/completions": (CompletionRequest, TextCompletion, "Create a text completion (legacy)", TextCompletion),
    "/v1/responses": (ResponsesRequest, None, "Create a response (stateless: no stored responses or conversations)", True),
    "/tokenize": (TokenizeRequest, None, "Tokenize text or chat messages", False),
    "/detokenize": (DetokenizeRequest, None, "Token ids to text", False),
}


def _ref(model: type[BaseModel] | None) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"} if model is not None else {"type": "object"}


def openapi_document() -> dict[str, Any]:
    requests = [(request, "validation") for request, _, _, _ in POSTS.values()]
    # the reply models' validation schemas: what a built reply is checked against (a field left out unless set
    # is optional there, and marked x-omitted-unless-set)
    replies = [(model, "validation") for model in (ChatCompletion, ChatCompletionChunk, TextCompletion, ErrorResponse)]
    _, schemas = models_json_schema(requests + replies, ref_template="#/components/schemas/{model}")
    components = schemas.get("$defs", {})
    paths: dict[str, Any] = {}
    for path, (model, reply, summary, events) in POSTS.items():
        ok = {"application/json": {"schema": _ref(reply)}}
        if events:  # server-sent events, each one's data an object of this shape
            ok["text/event-stream"] = {"schema": {"type": "string"},
                                       "x-event-schema": _ref(events if events is not True else None)}
        errors = {status: {"description": why, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
                  for status, why in ERRORS.items()}
        paths[path] = {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}},
            "responses": {"200": {"description": "OK", "content": ok}, **errors},
        }}
    for path in ("/v1/models", "/health"):
        paths[path] = {"get": {"responses": {"200": {"description": "OK", "content": {
            "application/json": {"schema": {"type": "object"}}}}}}}
    return {"openapi": "3.1.0", "info": {"title": "flaxchat", "version": __version__}, "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
