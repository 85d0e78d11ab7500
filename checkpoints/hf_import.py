"""Import a Hugging Face model folder: ``config.json`` + ``*.safetensors`` (single or sharded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from flaxchat.checkpoints.errors import CheckpointError
from flaxchat.checkpoints.layout import assemble_params
from flaxchat.model.config import ModelConfig, UnsupportedModelError


def read_hf_config(folder: Path, **overrides: Any) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(path, "file not found (a Hugging Face model folder needs config.json)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from None
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except UnsupportedModelError as exc:
        raise CheckpointError(path, str(exc)) from None
    except KeyError as exc:
        raise CheckpointError(path, f"missing required field {exc}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(index, f"not a valid safetensors index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(folder, "no *.safetensors files found")
    for file in files:
        if not file.is_file():
            raise CheckpointError(file, "file not found (listed in model.safetensors.index.json)")
    return files


def load_hf_folder(folder: str | Path, **overrides: Any) -> tuple[ModelConfig, dict]:
    """Read config and weights; raises ``CheckpointError`` naming the file on any problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a directory")
    cfg = read_hf_config(folder, **overrides)
    handles: dict[str, Any] = {}
    owner: dict[str, Path] = {}
    for file in _weight_files(folder):
        try:
            handle = safe_open(str(file), framework="flax")
            names = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(file, f"corrupt or truncated safetensors file ({exc})") from None
        for name in names:
            handles[name] = handle
            owner[name] = file

    def fetch(name: str) -> np.ndarray:
        handle = handles[name]  # KeyError: reported as a missing tensor
        try:
            # The flax reader understands bfloat16, which numpy's does not.
            return np.asarray(handle.get_tensor(name).astype("float32"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(owner[name], f"cannot read tensor {name!r} ({exc})") from None

    return cfg, assemble_params(cfg, fetch, folder)
