"""orbax round trip and the model store (import -> save -> restore without the original files)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxchat.checkpoints.hf_import import load_hf_folder
from flaxchat.checkpoints.orbax_io import restore_params, save_params
from flaxchat.checkpoints.store import import_path, is_stored, list_models, load_model
from flaxchat.model.transformer import Transformer, init_cache
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model


def _identical(a, b) -> bool:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(x, y), a, b))
    return bool(leaves) and all(leaves)


def test_orbax_round_trip_is_identical(tmp_path):
    make_tiny_model("qwen3", tmp_path / "hf")
    cfg, params = load_hf_folder(tmp_path / "hf")
    save_params(tmp_path / "ckpt", params)
    restored = restore_params(tmp_path / "ckpt", cfg)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert _identical(params, restored)


def test_a_store_in_the_per_layer_layout_is_read_and_stacked(tmp_path):
    """Stores written before the layers were stacked hold ``layers_{i}/...``: they restore to the stacked
    params, on the device or (for host-side quantisation) as numpy arrays."""
    make_tiny_model("llama", tmp_path / "hf")
    cfg, params = load_hf_folder(tmp_path / "hf")
    per_layer = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.num_layers):
        per_layer[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    save_params(tmp_path / "old", per_layer)
    assert _identical(params, restore_params(tmp_path / "old", cfg))
    on_host = restore_params(tmp_path / "old", cfg, on_device=False)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(on_host)) and _identical(params, on_host)


def test_store_import_restores_without_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXCHAT_HOME", str(tmp_path / "home"))
    torch_model = make_tiny_model("qwen2", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(_tiny_tokenizer_json())
    cfg, params = load_hf_folder(tmp_path / "hf")
    import_path(tmp_path / "hf", "tiny-qwen2")
    shutil.rmtree(tmp_path / "hf")  # restore must not need the original files
    stored = load_model("tiny-qwen2")
    assert stored.cfg == cfg
    assert _identical(params, stored.params)
    prompt = jnp.asarray([[1, 2, 3, 4]])
    logits, _ = Transformer(stored.cfg).apply({"params": stored.params}, prompt, jnp.arange(4)[None],
                                              init_cache(stored.cfg, 1, 8))
    with torch.no_grad():
        reference = torch_model(torch.tensor([[1, 2, 3, 4]])).logits[0].numpy()
    assert np.abs(np.asarray(logits[0]) - reference).max() <= 1e-4
    assert list_models() == ["tiny-qwen2"]


def test_store_import_gguf_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXCHAT_HOME", str(tmp_path / "home"))
    path = write_gguf(make_tiny_model("llama", tmp_path / "hf"), tmp_path / "tiny.gguf")
    first = import_path(path, "tiny")
    again = import_path(path, "tiny")
    assert first == again and list_models() == ["tiny"]
    stored = load_model("tiny")
    assert stored.chat_template and stored.tokenizer.special.eos_token == "<|im_end|>"
    assert stored.tokenizer.stop_ids == frozenset({2, 0})  # EOS <|im_end|> and <|endoftext|>
    assert stored.manifest["source"] == "gguf" and len(stored.manifest["sha256"]) == 64


KILLED_IMPORT = """
import os, pathlib, shutil, signal, sys
from flaxchat.checkpoints import store
point = sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "params":  # orbax wrote the params; nothing else yet
    real_save = store.save_params
    store.save_params = lambda *a, **k: (real_save(*a, **k), die())
if point == "manifest":  # everything written, not yet renamed into place
    real_write = pathlib.Path.write_text
    def write_text(self, *a, **k):
        real_write(self, *a, **k)
        if self.name == "manifest.json":
            die()
    pathlib.Path.write_text = write_text
if point in ("aside", "swapped"):  # after the old copy is renamed aside / after the new one took its place
    real_rename, renames = pathlib.Path.rename, []
    def rename(self, target):
        result = real_rename(self, target)
        renames.append(target)
        if len(renames) == (1 if point == "aside" else 2):
            die()
        return result
    pathlib.Path.rename = rename
store.import_path(sys.argv[1], "tiny")
"""


@pytest.mark.parametrize("point", ["params", "manifest", "aside", "swapped"])
def test_an_import_killed_at_any_point_leaves_the_store_consistent(tmp_path, monkeypatch, point):
    """``kill -9`` during ``flaxchat import`` over a stored model: the model is still listed and loads (the old
    copy or the new one, whole), no half-written folder is listed, and the next import cleans up."""
    import subprocess
    import sys

    home = tmp_path / "home"
    monkeypatch.setenv("FLAXCHAT_HOME", str(home))
    path = write_gguf(make_tiny_model("llama", tmp_path / "hf"), tmp_path / "tiny.gguf")
    import_path(path, "tiny")
    result = subprocess.run([sys.executable, "-c", KILLED_IMPORT, str(path), point], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "FLAXCHAT_HOME": str(home), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = [p.name for p in (home / "models").iterdir() if p.name.startswith(".")]
    assert leftovers  # the killed writer's folders are there ...
    assert is_stored("tiny") and list_models() == ["tiny"]  # ... yet the model is whole (put back if need be)
    assert load_model("tiny").manifest["source"] == "gguf"
    import_path(path, "tiny")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]  # the dead writer's leftovers are gone
    assert load_model("tiny").tokenizer.special.eos_token == "<|im_end|>"


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend.to_str()
