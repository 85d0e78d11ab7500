"""The real server (hypercorn on a loopback port) over a real engine with a tiny random model."""

from __future__ import annotations

from pathlib import Path

from serve.app import ServerSettings, create_app
from serve.chat import ServedModel
from serve.server import BackgroundServer
from tests.engine_fixtures import tiny_engine
from tests.gguf_writer import CHAT_TEMPLATE

TINY_ID = "tiny-llama"


def start_tiny_server(folder: Path, settings: ServerSettings = ServerSettings(), **engine_config):
    engine = tiny_engine(folder, **engine_config)
    model = ServedModel(TINY_ID, engine, engine.tokenizer, CHAT_TEMPLATE, "fp_test", aliases=("tiny",))
    server = BackgroundServer(create_app(model, settings)).start()
    return server, engine
