"""Import a Hugging Face model folder: ``config.json`` + ``*.safetensors`` (single or sharded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
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

    def read(name: str) -> np.ndarray:
        handle = handles[name]  # KeyError: reported as a missing tensor
        try:
            if handle.get_slice(name).get_dtype() in _FLOAT8:  # safetensors' readers stumble on float8
                return _read_float8(owner[name], name)
            # The flax reader understands bfloat16, which numpy's does not.
            return np.asarray(handle.get_tensor(name).astype("float32"))
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise CheckpointError(owner[name], f"cannot read tensor {name!r} ({exc})") from None

    block = _block_size(folder)

    def fetch(name: str) -> np.ndarray:
        scales = name + "_scale_inv"
        if scales not in handles:
            return read(name)
        try:
            return dequantize_fp8_blocks(read(name), read(scales), block)
        except ValueError as exc:
            raise CheckpointError(owner[name], f"tensor {name!r}: {exc}") from None

    return cfg, assemble_params(cfg, fetch, folder)


_FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_float8(file: Path, name: str) -> np.ndarray:
    """A float8 tensor of a safetensors file, widened to float32 (exactly), read by its header's offsets."""
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        raw = f.read(end - start)
    if len(raw) != end - start or len(raw) != math.prod(entry["shape"]):
        raise ValueError("truncated float8 data")
    return np.frombuffer(raw, _FLOAT8[entry["dtype"]]).reshape(entry["shape"]).astype(np.float32)


def _block_size(folder: Path) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of an FP8 checkpoint's config, if it names one."""
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    block = quantization.get("weight_block_size")
    return (int(block[0]), int(block[1])) if block else None


def dequantize_fp8_blocks(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
    """An FP8 checkpoint's weight (``float8_e4m3fn`` codes ``[out, in]``, read as float32) times its
    ``weight_scale_inv`` (``[ceil(out / b0), ceil(in / b1)]``: one factor per block, as DeepSeek-V3 and the
    Qwen ``-FP8`` models store them; the name notwithstanding, the factor multiplies). Each product is exact
    in float32 (a 4-bit mantissa times a float32), so the serving dtype rounds it once."""
    if codes.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"block scales need a 2-D weight and 2-D scales, got {codes.shape} and {scales.shape}")
    rows, cols = codes.shape
    if block is None:  # not in the config: the block that tiles the weight into the scales' grid
        block = (-(-rows // scales.shape[0]), -(-cols // scales.shape[1]))
    if scales.shape != (-(-rows // block[0]), -(-cols // block[1])):
        raise ValueError(f"scales of shape {scales.shape} do not tile a {codes.shape} weight in {block} blocks")
    factors = np.repeat(np.repeat(scales, block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return codes * factors
