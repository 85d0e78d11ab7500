"""From a model's name (or file) to a running ``ServedModel``: loaded from the store, its engine warmed up,
its provenance recorded. The HTTP server (``flaxchat serve``) and the offline ``flaxchat.LLM`` both start
here, so a request's bits are the same through either."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from flaxchat.chat.request import ServedModel

log = logging.getLogger("flaxchat")


@dataclass(frozen=True)
class LaunchOptions:
    """How the weights are loaded and the engine is built (``flaxchat serve``'s flags of the same names)."""

    slots: int = 8
    max_len: int | None = None  # context per slot; default min(the model's, sampling.shapes.DEFAULT_CONTEXT)
    queue_size: int = 64
    dtype: str | None = None  # compute/param dtype; None: default_dtype() (as stored on CPU, bfloat16 on GPU/TPU)
    weights: str = "auto"  # float32 | int8 | int4 | auto (model.quant.resolve_weights)
    prompt_activations: str = "float32"
    kv_dtype: str = "auto"  # auto: kv_dtype_for(weights)
    steps_per_call: int = 1
    prefill_chunk: int = 128
    prefix_cache_mb: float = 256.0
    content_filter: tuple[str, ...] = field(default_factory=tuple)
    warmup: bool = True  # compile every step before serving; False: each on first use (no bits change)
    mesh: str | None = None  # "data=2,model=4" (model/sharding.py); None: every local device on "model" if it divides the heads


def setup_jax() -> None:
    """Persistent compilation cache under FLAXCHAT_HOME so restarts reuse compiled steps (unless the caller
    already chose a cache directory)."""
    import jax

    from flaxchat.checkpoints.store import flaxchat_home

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(flaxchat_home() / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def default_dtype() -> str | None:
    """The compute and parameter dtype when none is asked for: bfloat16 on GPUs and TPUs (their matrix units'
    type; norms, softmax and logits still accumulate in float32), the checkpoint's own (float32) on a CPU."""
    import jax

    return None if jax.default_backend() == "cpu" else "bfloat16"


def kv_dtype_for(choice: str, weights: str) -> str:
    """``auto``: int8 (codes with a float32 scale per 32 elements, 56 % of bfloat16's memory) with quantised
    weights, whose CPU kernels read int8 entries as fast as bfloat16 ones and keep the quality bar with them
    (int4 weights + int8 KV: 6 of 6 greedy continuations, log-likelihood 0.22 %, bench/RESULTS.md);
    bfloat16 otherwise (float32 weights: the parity setting, and accelerators, where no kernel reads int8)."""
    from flaxchat.model.quant import QUANTISED

    if choice != "auto":
        return choice
    return "int8" if weights in QUANTISED else "bfloat16"


def resolve_model(model: str | Path, stored_only: bool = False) -> str:
    """The store name for ``model``: a stored name, the default model (pulled if missing), or a local GGUF
    file or Hugging Face folder, imported under its stem (again when the file changed since).
    ``stored_only``: refuse to import or pull (in a cluster, where saving is every process's collective)."""
    from flaxchat.checkpoints.store import (DEFAULT_MODEL, canonical_name, file_sha256, import_path, is_stored,
                                            model_dir, pull)

    def refuse_in_a_cluster(name: str) -> None:
        if stored_only:
            raise ValueError(f"{model} is not in the store as {name!r} (or changed since): with several "
                             f"processes, run `flaxchat import {model} --name {name}` (or `flaxchat pull`) on every "
                             "host first")

    path = Path(model).expanduser()
    if path.exists() and not (path / "manifest.json").is_file():
        name = path.stem.lower()
        recorded = json.loads((model_dir(name) / "manifest.json").read_text()) if is_stored(name) else {}
        current = {"path": str(path.absolute())} | ({"sha256": file_sha256(path)} if path.is_file() else {})
        if any(recorded.get(k) != v for k, v in current.items()):
            refuse_in_a_cluster(name)
            log.info("importing %s as %s", path, name)
            import_path(path, name, progress=True)
        return name
    if (path / "manifest.json").is_file():  # a stored model's own folder
        return path.name
    name = canonical_name(str(model))
    if not is_stored(name) and name == DEFAULT_MODEL:
        refuse_in_a_cluster(name)
        pull(name)
    return name


def engine_config(options: LaunchOptions, weights: str):
    """The ``EngineConfig`` that ``options`` ask for (``weights``: the loaded projections' kind)."""
    from flaxchat.sampling.engine import EngineConfig

    return EngineConfig(slots=options.slots, max_len=options.max_len, queue_size=options.queue_size,
                        steps_per_call=options.steps_per_call, kv_dtype=kv_dtype_for(options.kv_dtype, weights),
                        prefill_chunk=options.prefill_chunk, prefix_cache_mb=options.prefix_cache_mb,
                        warmup=options.warmup, mesh=options.mesh)


def _load(model: str | Path, options: LaunchOptions):
    """(store name, loaded model) of ``model``; in a cluster, only from the store."""
    import jax

    from flaxchat.checkpoints.store import load_model

    setup_jax()
    name = resolve_model(model, stored_only=jax.process_count() > 1)
    loaded = load_model(name, dtype=options.dtype or default_dtype(), weights=options.weights,
                        prompt_activations=options.prompt_activations, mesh=options.mesh)
    if not loaded.chat_template:
        raise ValueError(f"model {name!r} has no chat template; the chat API needs one")
    return name, loaded


def _engine_steps(name: str, loaded, config):
    """The device steps for ``config``, and what every process must agree on to replay them in lockstep."""
    from flaxchat.sampling.engine import context_length
    from flaxchat.sampling.lockstep import settings_digest
    from flaxchat.sampling.steps import EngineSteps

    steps = EngineSteps.for_engine(loaded.cfg, loaded.params, context_length(loaded.cfg, config), config)
    return steps, settings_digest(name, loaded.cfg, config)


def launch(model: str | Path, options: LaunchOptions = LaunchOptions(), progress: bool = True) -> ServedModel:
    """Load ``model`` and start its engine (compiles every step it will use before returning, unless
    ``options.warmup`` is False; ``progress``: a bar of the steps compiled, of the total). In a cluster
    (``flaxchat/cluster.py``) this is process 0's part: the engine's device calls are replayed by the others
    (``follow``)."""
    import jax

    from flaxchat.checkpoints.provenance import fingerprint, provenance
    from flaxchat.checkpoints.store import ALIASES
    from flaxchat.model.sharding import format_mesh
    from flaxchat.sampling.engine import Engine
    from flaxchat.serve.memory import release_freed_memory

    name, loaded = _load(model, options)
    release_freed_memory()  # the float checkpoint a quantised model was made from
    weights = loaded.cfg.weights
    config = engine_config(options, weights)
    steps, settings = _engine_steps(name, loaded, config)
    if jax.process_count() > 1:
        from flaxchat.cluster import KeyValueChannel
        from flaxchat.sampling.lockstep import Leader

        steps = Leader(steps, KeyValueChannel(), settings)
    engine = Engine(loaded.cfg, loaded.params, loaded.tokenizer, config, steps=steps)
    log.info("warming up %s (%d slots, %d-token context, %s weights, %s KV cache, %d steps per call, "
             "%d-block prefix cache)...", name, options.slots, engine.max_len, weights, engine.steps.kv_dtype,
             options.steps_per_call, engine.prefix.capacity)
    engine.start(progress)
    release_freed_memory()  # the compiler's scratch memory
    setup = {"weights": weights, "kv_dtype": str(engine.steps.kv_dtype),
             "prompt_activations": loaded.cfg.prompt_activations}
    if engine.steps.mesh is not None:  # partitioned programs sum in another order: other bits than one device's
        setup["mesh"] = format_mesh(engine.steps.mesh)
    if jax.process_count() > 1:  # collectives between processes may sum in another order than within one
        setup["processes"] = jax.process_count()
    parts = provenance(loaded.path, loaded.manifest, setup, loaded.chat_template)
    aliases = tuple(sorted(alias for alias, target in ALIASES.items() if target == name))
    return ServedModel(name, engine, loaded.tokenizer, loaded.chat_template, fingerprint(parts), aliases=aliases,
                       content_filter=options.content_filter, provenance=parts)


def follow(model: str | Path, options: LaunchOptions = LaunchOptions()):
    """A cluster's process other than 0: load ``model`` onto this process's devices of the mesh and run
    process 0's device calls until its engine stops (``sampling/lockstep.py``); what it ran (``Followed``)."""
    from flaxchat.cluster import KeyValueChannel
    from flaxchat.sampling import lockstep

    name, loaded = _load(model, options)
    steps, settings = _engine_steps(name, loaded, engine_config(options, loaded.cfg.weights))
    log.info("following process 0's engine (%s)", name)
    return lockstep.follow(steps, KeyValueChannel(), settings)
