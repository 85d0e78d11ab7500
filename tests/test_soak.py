"""The soak of ``bench/soak.py`` in short (issue 14): many clients for ``FLAXCHAT_SOAK_SECONDS`` (60 s, the
issue's CI version; bench/soak.py runs the 10-minute one) against the real server over the tiny
model, mixing streaming, ``n``, forced tool calls, ``json_schema``, long prompts, dropped streams and
malformed bodies. Nothing may fail or go unanswered, no program may compile, every slot must be free at the
end, and a seeded request asked during the load must get its reply alone."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import TINY_ID, serving

SECONDS = float(os.environ.get("FLAXCHAT_SOAK_SECONDS", "60"))


def _bench_soak():
    path = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("soak"), model={"context": 2048}, slots=4, max_len=2048,
                       warmup=True)  # asserts nothing compiles under the load


def test_mixed_load_breaks_nothing(server):
    soak = _bench_soak()
    soak.LONG_WORDS = 200  # ~1,100 tokens of the tiny model's byte-level vocabulary
    base = server.url + "/v1"
    alone = httpx.post(base + "/chat/completions", json={"model": TINY_ID, **soak.SEEDED}, timeout=60)
    alone = alone.json()["choices"][0]["message"]["content"]
    compiles = server.engine.compile_count
    result = asyncio.run(soak.soak(base, TINY_ID, clients=16, seconds=SECONDS))
    served = sum(result["statuses"].values())
    assert result["failures"] == 0 and result["unanswered"] == 0, result
    assert served >= 50 and not any(status >= 500 for _, status in result["statuses"])
    assert {kind for kind, _ in result["statuses"]} >= {"stream", "n", "tools", "json_schema", "long", "malformed"}
    assert result["seeded"] and all(reply == alone for reply in result["seeded"])
    assert server.engine.compile_count == compiles
    deadline = time.monotonic() + 10  # a dropped stream's slot is freed at its next token
    while server.engine.busy_slots and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.busy_slots == 0 and server.engine.healthy
