"""A tiny random Llama with a byte-level tokenizer, served by a real Engine (no canned outputs)."""

from __future__ import annotations

from pathlib import Path

from checkpoints.gguf_import import load_gguf
from checkpoints.tokenizer_files import special_tokens_from_config
from model.tokenizer import HFTokenizer
from sampling.engine import Engine, EngineConfig
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model


def tiny_model(folder: Path):
    """(cfg, params, tokenizer) of a tiny random Llama imported through the GGUF path."""
    imported = load_gguf(write_gguf(make_tiny_model("llama", folder / "hf"), folder / "tiny.gguf"))
    json_text = imported.tokenizer_files["tokenizer.json"].decode()
    tokenizer = HFTokenizer.from_json(json_text, special_tokens_from_config(imported.tokenizer_config, {}))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokenizer = HFTokenizer.from_json(json_text, special_tokens_from_config(imported.tokenizer_config, vocab))
    return imported.cfg, imported.params, tokenizer


def tiny_engine(folder: Path, **config) -> Engine:
    cfg, params, tokenizer = tiny_model(folder)
    return Engine(cfg, params, tokenizer, EngineConfig(**{"slots": 4, "max_len": 128, **config})).start()
