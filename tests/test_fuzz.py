"""Requests generated from the server's own ``/openapi.json`` (schemathesis, valid and invalid bodies) against the
served tiny model: no response is a 5xx, every error has the documented shape, every reply its model's.

A short run for CI (``FUZZ_EXAMPLES`` per operation, >= 300 cases in all); ``FLAXCHAT_FUZZ_EXAMPLES`` asks for a
longer one. Generation lengths and ``n`` are clamped so a case costs milliseconds on the tiny model: the fuzzing
is of what the server accepts and refuses, not of how long it takes to generate 128 x 200 tokens.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from flaxchat.serve.objects import ChatCompletion, ErrorResponse, TextCompletion
from flaxchat.serve.openapi import openapi_document
from tests.server_fixtures import serving

FUZZ_EXAMPLES = int(os.environ.get("FLAXCHAT_FUZZ_EXAMPLES", "45"))
SCHEMA = schemathesis.openapi.from_dict(openapi_document())
REPLY_MODELS = {"/v1/chat/completions": ChatCompletion, "/v1/completions": TextCompletion}
SEEN: Counter = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("fuzz"), slots=4, max_len=256)


def _bounded(body: object) -> object:
    """The generated body with its generation lengths and choice counts kept small (other fields untouched)."""
    if isinstance(body, dict):
        for field, most in (("max_tokens", 8), ("max_completion_tokens", 8), ("max_output_tokens", 8), ("n", 3),
                            ("best_of", 3)):
            if isinstance(body.get(field), int) and not isinstance(body.get(field), bool) and body[field] > most:
                body[field] = most
    return body


@SCHEMA.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_generated_requests_never_break_the_server(case, server):
    case.body = _bounded(case.body)
    response = case.call(base_url=server.url, timeout=120)
    SEEN[(case.path, response.status_code // 100)] += 1
    assert response.status_code < 500, (case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        ErrorResponse.model_validate(response.json())
    elif case.path in REPLY_MODELS and "json" in response.headers.get("content-type", ""):
        REPLY_MODELS[case.path].model_validate(response.json())


def test_the_fuzzing_ran_enough_cases(server):
    """(after the parametrised cases above, which run first in this module) at least 300 cases, and both
    accepted and refused bodies among them for the generating endpoints."""
    assert sum(SEEN.values()) >= 300, SEEN
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        assert SEEN[(path, 2)] > 0 and SEEN[(path, 4)] > 0, (path, SEEN)
