"""Runs in a process of its own with fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
which must be set before JAX starts): serves seeded requests on several meshes and prints what they gave as
one JSON line, for ``tests/test_sharding.py`` to compare.

``python -m tests.mesh_worker tiny FOLDER [--xla-attention] [--weights W] [--meshes M ...]``: a tiny random model
(4 heads, 2 KV heads, so ``model=4`` splits the query heads and replicates the KV heads, ``model=8`` replicates
both); on one device and on each mesh (default: 1x8, 2x4, 4x2, 8x1), one seeded request alone and then again
among others, and the layout of a few params and the cache.
``--xla-attention`` turns the CPU kernels off so the XLA formulation (what GPUs and TPUs run) is partitioned;
``--moe``: a tiny Qwen3-MoE (4 experts) instead, for meshes with an ``expert`` axis.

``python -m tests.mesh_worker roundtrip FOLDER``: orbax params saved from one mesh, restored into another.

``python -m tests.mesh_worker default MESH [MESH ...]``: greedy continuations of the default model's test prompts on
each ``MESH`` (the store under ``FLAXCHAT_HOME``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

MESHES = ("model=8", "data=2,model=4", "data=4,model=2", "data=8")
PROMPT = list(range(10, 30))


def _layout(array) -> dict:
    return {"spec": [None if a is None else str(a) for a in array.sharding.spec],
            "shard": list(array.addressable_shards[0].data.shape), "devices": len(array.sharding.device_set)}


def _matrix_layout(params: dict, name: str) -> dict | None:
    """A float projection's layout (quantised ones fuse q/k/v and keep codes: their codes' layout)."""
    if name not in params:
        return None
    return _layout(params[name]["kernel"] if "kernel" in params[name] else params[name]["codes"])


def _cache_gathers(steps) -> dict[str, int]:
    """All-gathers of a cache- or pool-shaped (5-D) array in the compiled programs that touch the cache (a
    one-row decode, the prefix pool's block copies, a slot copy): a data mesh must work on each shard's rows
    where they live."""
    import re

    import jax.numpy as jnp

    state = steps.init_state()
    rows = steps.shards.host_rows([0], 1) if steps.shards else (np.zeros(1, np.int32),)
    blocks = steps._block_list([0, 1])
    programs = {
        "decode": steps._decode[1].lower(steps.params, state.replace(pool=None), *rows),
        "load_blocks": steps._load_blocks.lower(state, jnp.int32(1), blocks, jnp.int32(2)),
        "save_blocks": steps._save_blocks.lower(state, jnp.int32(1), blocks, jnp.int32(0), jnp.int32(2)),
        "copy_slot": steps._copy_slot.lower(state, jnp.int32(1), jnp.int32(steps.slots - 1)),
    }
    return {name: len(re.findall(r"= \w+\[(?:\d+,){4}\d+\]\S* all-gather", lowered.compile().as_text()))
            for name, lowered in programs.items()}


def run_tiny(folder: Path, xla_attention: bool, weights: str, meshes: list[str], moe: bool = False) -> dict:
    from flaxchat.model import kernels
    from flaxchat.sampling.engine import Engine, EngineConfig
    from flaxchat.sampling.params import SamplingParams
    from tests.engine_fixtures import tiny_model, tiny_moe_model, with_weights

    if xla_attention:
        kernels.available = lambda: False
    if moe:
        cfg, params, tokenizer = tiny_moe_model(folder)
    else:
        cfg, params, tokenizer = with_weights(tiny_model(folder), weights)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=7, logprobs=True, top_logprobs=2)
    report = {}
    for mesh in ["data=1,model=1", *meshes]:
        engine = Engine(cfg, params, tokenizer, EngineConfig(slots=8, max_len=64, warmup=False, mesh=mesh,
                                                             prefix_cache_mb=0.25)).start()
        try:
            alone = engine.submit(PROMPT, seeded).result()[0]
            # one of them with n=2: its second choice's slot is on another data shard (copy_slot across shards)
            others = [engine.submit(list(range(3 + i, 14 + 2 * i)), SamplingParams(max_tokens=10 + i, temperature=1.0,
                                                                                    seed=100 + i, n=1 + (i == 0)))
                      for i in range(5)]
            loaded = engine.submit(PROMPT, seeded).result()[0]
            pair = others[0].result()
            for handle in others[1:]:
                handle.result()
        finally:
            engine.stop()  # the engine thread owns the state until then
        steps, layers = engine.steps, engine.steps.params["layers"]
        report[mesh] = {
            "cache_gathers": _cache_gathers(steps) if steps.mesh is not None else {},
            "alone": [[e.token_id, e.logprob] for e in alone if e.token_id is not None],
            "loaded": [[e.token_id, e.logprob] for e in loaded if e.token_id is not None],
            "pair": [[e.token_id for e in pair[choice] if e.token_id is not None] for choice in sorted(pair)],
            "experts": _layout(layers["mlp"]["experts"]["gate_proj"]) if moe and steps.mesh is not None else None,
            "layout": {} if steps.mesh is None else {
                "q_proj": _matrix_layout(layers["attn"], "q_proj"), "k_proj": _matrix_layout(layers["attn"], "k_proj"),
                "down_proj": _matrix_layout(layers["mlp"], "down_proj"), "cache": _layout(engine._state.cache.k),
            },
        }
    return report


def run_default(meshes: list[str]) -> dict:
    """The default model's greedy continuations of the default-model prompts on each mesh:
    ``{"prompts": [...], "meshes": {mesh: {"tokens", "prompt_ids"}}}``."""
    import flaxchat
    from tests.test_default_model import PROMPTS

    from flaxchat.model.sharding import format_mesh

    report = {}
    for mesh in meshes:
        with flaxchat.LLM("smollm2-135m-instruct", weights="float32", kv_dtype="float32", slots=8, max_len=128,
                          warmup=False, mesh=mesh) as llm:
            results = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], max_tokens=16,
                               temperature=0.0, progress=False)
            report[format_mesh(llm.served.engine.steps.mesh)] = {
                "tokens": [r.choices[0].token_ids for r in results],
                "prompt_ids": [r.prompt_token_ids for r in results]}
    return {"prompts": PROMPTS, "meshes": report}


def run_roundtrip(folder: Path) -> dict:
    """Save the tiny model's params from a 1x8 mesh, restore them into 4x2: each array's layout, its values,
    and the largest host array the restore path made (a shard's, never a whole array's)."""
    import jax

    from flaxchat.checkpoints import orbax_io
    from flaxchat.model import sharding
    from tests.engine_fixtures import tiny_model

    cfg, params, _ = tiny_model(folder)
    source = sharding.make_mesh(cfg, "model=8")
    orbax_io.save_params(folder / "params", sharding.place(params, sharding.param_shardings(params, cfg, source)))
    target = sharding.make_mesh(cfg, "data=4,model=2")
    host_sizes = []

    class Recording:  # numpy, with every asarray's size noted
        def __getattr__(self, name):
            return getattr(np, name)

        def asarray(self, *args, **kwargs):
            array = np.asarray(*args, **kwargs)
            host_sizes.append(int(array.size))
            return array

    orbax_io.np = Recording()
    restored = orbax_io.restore_params(folder / "params", cfg, mesh=target)
    orbax_io.np = np
    expected = sharding.param_shardings(params, cfg, target)
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {
        "layouts_as_rules": all(leaf.sharding.spec == want.spec and leaf.sharding.mesh == target
                                for (_, leaf), want in zip(flat, jax.tree.leaves(expected))),
        "values_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params))),
        "split": [str(path[-2].key) for path, leaf in flat if any(leaf.sharding.spec)],
        "largest_host_array": max(host_sizes),
        "largest_split_array": max(int(np.asarray(a).size) for (_, a) in flat if any(a.sharding.spec)),
        "largest_shard": max(int(np.prod(a.addressable_shards[0].data.shape)) for (_, a) in flat),
    }


def main(argv: list[str]) -> None:
    import jax

    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    if argv[0] == "roundtrip":
        report = run_roundtrip(Path(argv[1]))
    elif argv[0] == "tiny":
        weights = argv[argv.index("--weights") + 1] if "--weights" in argv else "float32"
        meshes = argv[argv.index("--meshes") + 1:] if "--meshes" in argv else list(MESHES)
        report = run_tiny(Path(argv[1]), "--xla-attention" in argv, weights, meshes, moe="--moe" in argv)
    else:
        report = run_default(argv[1:])
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
