"""``GET /openapi.json``: the served API described from the request models themselves (``chat/protocol.py``),
so the document cannot drift from what the server validates (fuzzers read it; see issue 14)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from flaxchat import __version__
from flaxchat.chat.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from flaxchat.chat.responses import ResponsesRequest

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
# status -> when (serve/errors.py has the rule)
ERRORS = {"400": "Invalid format: not JSON, a missing field, a wrong type, an unknown field; or the context is exceeded",
          "401": "Missing or wrong API key", "402": "The key's token budget is spent", "404": "Unknown model",
          "413": "Body too large", "422": "Invalid parameters: a well-formed value that cannot be used",
          "429": "Rate limit", "500": "Server error", "503": "Overloaded or shutting down"}
POSTS: dict[str, tuple[type[BaseModel], str, bool]] = {  # path -> (request model, summary, streams)
    "/v1/chat/completions": (ChatCompletionRequest, "Create a chat completion", True),
    "/v1/completions": (CompletionRequest, "Create a text completion (legacy)", True),
    "/v1/responses": (ResponsesRequest, "Create a response (stateless: no stored responses or conversations)", True),
    "/tokenize": (TokenizeRequest, "Tokenize text or chat messages", False),
    "/detokenize": (DetokenizeRequest, "Token ids to text", False),
}


def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema([(model, "validation") for model, _, _ in POSTS.values()],
                                    ref_template="#/components/schemas/{model}")
    components = {**schemas.get("$defs", {}), "Error": ERROR}
    paths: dict[str, Any] = {}
    for path, (model, summary, streams) in POSTS.items():
        ok = {"application/json": {"schema": {"type": "object"}}}
        if streams:
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        errors = {status: {"description": why, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}} for status, why in ERRORS.items()}
        paths[path] = {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": {"200": {"description": "OK", "content": ok}, **errors},
        }}
    for path in ("/v1/models", "/health"):
        paths[path] = {"get": {"responses": {"200": {"description": "OK", "content": {
            "application/json": {"schema": {"type": "object"}}}}}}}
    return {"openapi": "3.1.0", "info": {"title": "flaxchat", "version": __version__}, "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
