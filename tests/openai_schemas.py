"""JSON schemas of the OpenAI chat objects (as the API reference describes them), for shape checks."""

_TOKEN_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {
        "token": {"type": "string"},
        "logprob": {"type": "number", "maximum": 0},
        "bytes": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0, "maximum": 255}},
    },
}
_LOGPROBS = {
    "type": ["object", "null"],
    "required": ["content"],
    "properties": {"content": {"type": ["array", "null"], "items": {
        **_TOKEN_LOGPROB,
        "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**_TOKEN_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": _TOKEN_LOGPROB}},
    }}},
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_COMMON = {
    "id": {"type": "string", "pattern": "^chatcmpl-"},
    "created": {"type": "integer"},
    "model": {"type": "string"},
    "system_fingerprint": {"type": "string"},
}
FINISH = {"enum": ["stop", "length", "tool_calls", "content_filter"]}

CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_COMMON,
        "object": {"const": "chat.completion"},
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["index", "message", "finish_reason", "logprobs"],
            "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "required": ["role", "content", "refusal"],
                            "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                           "refusal": {"type": ["string", "null"]}}},
                "finish_reason": FINISH,
                "logprobs": _LOGPROBS,
            },
        }},
        "usage": _USAGE,
    },
}

CHAT_COMPLETION_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        **_COMMON,
        "object": {"const": "chat.completion.chunk"},
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "delta", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "delta": {"type": "object", "properties": {"role": {"const": "assistant"},
                                                           "content": {"type": ["string", "null"]}},
                          "additionalProperties": False},
                "finish_reason": {"anyOf": [FINISH, {"type": "null"}]},
                "logprobs": _LOGPROBS,
            },
        }},
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
    },
}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                             "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                                            "param": {"type": ["string", "null"]},
                                            "code": {"type": ["string", "null"]}},
                             "additionalProperties": False}},
    "additionalProperties": False,
}
