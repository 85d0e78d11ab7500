"""What a seeded reply depends on, part by part: the weights, the model config, the tokenizer, the chat
template, the engine build (its numerics) and the numeric setup (weights mode, KV cache type). Each part is
a short hash; the server's ``system_fingerprint`` hashes them together, and replay (``flaxchat replay``)
compares them one by one to name what changed when a result no longer reproduces."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The engine's numerics: bump when the same seed may give other tokens on the same weights.
# engine-4: one attention kernel, XLA without FMA (engine-3: two-level categorical draw; engine-2: int8 blocks
# and kernel).
ENGINE_BUILD = "flaxchat-0.1.0/engine-4"
PARTS = ("weights", "config", "tokenizer", "chat_template", "engine", "setup")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tokenizer_config(model_dir: Path) -> bytes:
    """tokenizer_config.json without its chat template (a part of its own)."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return b""
    config = json.loads(path.read_text())
    config.pop("chat_template", None)
    return json.dumps(config, sort_keys=True).encode()


def provenance(model_dir: Path, manifest: Mapping[str, Any], setup: Mapping[str, Any] | None = None,
               chat_template: str | None = None) -> dict[str, str]:
    """Each part's hash for a stored model (``checkpoints/store.py``) served with ``setup``. The weights'
    part is the hash of the weights themselves (recorded at import), or of where they came from for a
    store written before that was recorded."""
    weights = manifest.get("params_sha256") or json.dumps({k: v for k, v in manifest.items() if k != "name"},
                                                          sort_keys=True)
    config = model_dir / "config.json"
    tokenizer = b"".join(name.encode() + (model_dir / name).read_bytes()
                         for name in TOKENIZER_FILES if (model_dir / name).is_file())
    if chat_template is None:
        template_path = model_dir / "chat_template.jinja"
        chat_template = template_path.read_text() if template_path.is_file() else ""
    return {
        "weights": _short(weights.encode()),
        "config": _short(config.read_bytes() if config.is_file() else b""),
        "tokenizer": _short(tokenizer + _tokenizer_config(model_dir)),
        "chat_template": _short(chat_template.encode()),
        "engine": ENGINE_BUILD,
        "setup": _short(json.dumps(dict(setup or {}), sort_keys=True).encode()),
    }


def fingerprint(parts: Mapping[str, str]) -> str:
    """The parts as one ``system_fingerprint``: equal fingerprints, equal bits for a seed."""
    return "fp_" + _short(json.dumps(dict(parts), sort_keys=True).encode())[:12]


def changed_parts(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """The parts whose hashes differ (in ``PARTS`` order), for a replay that no longer reproduces."""
    return [part for part in PARTS if recorded.get(part) != current.get(part)]
