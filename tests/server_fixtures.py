"""The real server (hypercorn on a loopback port) over a real engine with a tiny random model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai

from flaxchat.serve.app import ServerSettings, create_app
from flaxchat.chat.request import ServedModel
from flaxchat.serve.server import BackgroundServer
from tests.engine_fixtures import tiny_engine
from tests.gguf_writer import CHAT_TEMPLATE

TINY_ID = "tiny-llama"


def start_tiny_server(folder: Path, settings: ServerSettings = ServerSettings(), model: dict | None = None,
                      content_filter: tuple[str, ...] = (), **engine_config):
    """``model``: options of tests.engine_fixtures.tiny_model (kind, context, chat_template, extra_tokens)."""
    engine = tiny_engine(folder, model, **engine_config)
    template = (model or {}).get("chat_template", CHAT_TEMPLATE)
    model = ServedModel(TINY_ID, engine, engine.tokenizer, template, "fp_test", aliases=("tiny",),
                        content_filter=content_filter)
    server = BackgroundServer(create_app(model, settings)).start()
    return server, engine


def serving(folder: Path, settings: ServerSettings = ServerSettings(), model: dict | None = None,
            **engine_config) -> Iterator:
    """A module fixture's body: the tiny server (its engine as ``server.engine``), stopped afterwards."""
    server, engine = start_tiny_server(folder, settings, model, **engine_config)
    server.engine = engine
    yield server
    server.stop()
    engine.stop()


def openai_client(server, api_key: str = "unused") -> openai.OpenAI:
    """The official client against ``server`` (no retries: a test sees every error)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)
