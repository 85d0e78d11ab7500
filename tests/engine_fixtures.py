"""A tiny random Llama with a byte-level tokenizer, served by a real Engine (no canned outputs)."""

from __future__ import annotations

from pathlib import Path

from flaxchat.checkpoints.gguf_import import load_gguf
from flaxchat.checkpoints.tokenizer_files import special_tokens_from_config
from flaxchat.model.quant import prepare_weights
from flaxchat.model.tokenizer import HFTokenizer
from flaxchat.sampling.engine import Engine, EngineConfig
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model


def tiny_model(folder: Path, kind: str = "llama", context: int | None = None, shape: dict | None = None,
               **gguf_options):
    """(cfg, params, tokenizer) of a tiny random model imported through the GGUF path (``kind`` as in
    tests.hf_reference; ``context`` overrides max_position_embeddings, ``shape`` other config fields;
    ``gguf_options`` reach write_gguf)."""
    overrides = dict(shape or {}) | ({} if context is None else {"max_position_embeddings": context})
    hf = make_tiny_model(kind, folder / "hf", **overrides)
    imported = load_gguf(write_gguf(hf, folder / "tiny.gguf", arch="qwen3" if kind == "qwen3" else "llama",
                                    **gguf_options))
    json_text = imported.tokenizer_files["tokenizer.json"].decode()
    tokenizer = HFTokenizer.from_json(json_text, special_tokens_from_config(imported.tokenizer_config, {}))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokenizer = HFTokenizer.from_json(json_text, special_tokens_from_config(imported.tokenizer_config, vocab))
    return imported.cfg, imported.params, tokenizer


def with_weights(model: tuple, weights: str) -> tuple:
    """``(cfg, params, tokenizer)`` of ``tiny_model`` with its projections in ``weights`` ("float32", "int8" or "int4")."""
    cfg, params, tokenizer = model
    cfg, params = prepare_weights(cfg, params, weights)
    return cfg, params, tokenizer


def tiny_engine(folder: Path, model: dict | None = None, warmup: bool = False, **config) -> Engine:
    """A started engine on ``tiny_model``. Its steps compile on first use (``warmup=False``): a test compiles
    only the shapes it runs, not the ~25 a server's warm-up does. Pass ``warmup=True`` where a test checks
    that serving never compiles, or times the server."""
    cfg, params, tokenizer = tiny_model(folder, **(model or {}))
    config = {"slots": 4, "max_len": 128, **config, "warmup": warmup}
    return Engine(cfg, params, tokenizer, EngineConfig(**config)).start()


def tiny_moe_model(folder: Path, kind: str = "qwen3_moe", context: int | None = None):
    """(cfg, params, tokenizer) of a tiny random mixture of experts (``kind``: qwen2_moe, qwen3_moe or mixtral) imported
    from its Hugging Face folder (the GGUF path has no experts), with ``tiny_model``'s byte-level tokenizer
    (the same 320-entry vocabulary); ``context`` overrides max_position_embeddings."""
    from flaxchat.checkpoints.hf_import import load_hf_folder

    make_tiny_model(kind, folder / "moe", **({} if context is None else {"max_position_embeddings": context}))
    cfg, params = load_hf_folder(folder / "moe")
    _, _, tokenizer = tiny_model(folder / "tokenizer")
    return cfg, params, tokenizer
