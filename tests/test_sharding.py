"""Sharding over a device mesh (``model/sharding.py``): the rules table on real model shapes, and serving on
meshes of 8 fake CPU devices in a process of their own (``tests/mesh_worker.py``; the device count is fixed
when JAX starts).

The mesh contract: on every mesh a seeded request gives the same tokens as on one device with logprobs within
1e-4 (partitioned sums add in another order), and on a given mesh the same bits alone and among other
requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from flaxchat.model.config import ModelConfig
from flaxchat.model.quant import quantize_params
from flaxchat.model.sharding import (MeshError, default_mesh_shape, format_mesh, make_mesh, param_axes, parse_mesh,
                                     partition_spec, CACHE_AXES)
from flaxchat.model.transformer import param_shapes
from flaxchat.sampling.data_shards import DataShards

ROOT = Path(__file__).resolve().parent.parent


def _config(hidden, inter, layers, heads, kv_heads, vocab, **extra) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=4096, **extra)


LLAMA3_8B = _config(4096, 14336, 32, 32, 8, 128256)
SMOLLM2_135M = _config(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True)
QWEN3_LIKE = _config(256, 512, 2, 8, 4, 1000, qk_norm=True, qkv_bias=True)


def _specs(cfg: ModelConfig, mesh: AbstractMesh, shapes=None) -> dict[str, P]:
    shapes = shapes if shapes is not None else param_shapes(cfg)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(str(k.key) for k in path): partition_spec(param_axes(path, leaf.ndim), leaf.shape, cfg, mesh)
            for path, leaf in flat}


def test_mesh_specs_parse_and_print():
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4, "expert": 1}
    assert parse_mesh("model=8") == {"data": 1, "model": 8, "expert": 1}
    assert format_mesh({"data": 2, "model": 4}) == "data=2,model=4"
    assert format_mesh(parse_mesh("model=2,expert=4")) == "data=1,model=2,expert=4"
    for bad in ("tensor=2", "model=0", "model=two", "model"):
        with pytest.raises(MeshError):
            parse_mesh(bad)
    with pytest.raises(MeshError, match="needs 8 devices; 1 available"):
        make_mesh(SMOLLM2_135M, "data=2,model=4", devices=jax.devices()[:1])
    assert make_mesh(SMOLLM2_135M, "data=1,model=1") is None  # one device: the unpartitioned programs


def test_the_default_mesh_puts_every_device_on_model_only_where_it_divides_the_heads():
    assert default_mesh_shape(LLAMA3_8B, 8) == {"data": 1, "model": 8}
    assert default_mesh_shape(SMOLLM2_135M, 8) == {"data": 1, "model": 1}  # 9 heads, 3 KV heads
    assert default_mesh_shape(SMOLLM2_135M, 3) == {"data": 1, "model": 3}
    assert default_mesh_shape(LLAMA3_8B, 1) == {"data": 1, "model": 1}


def test_llama3_8b_splits_heads_mlp_and_vocabulary_over_model():
    specs = _specs(LLAMA3_8B, AbstractMesh((2, 4), ("data", "model")))
    assert specs["layers/attn/q_proj/kernel"] == P(None, None, "model")
    assert specs["layers/attn/k_proj/kernel"] == P(None, None, "model")  # 8 KV heads over 4
    assert specs["layers/attn/o_proj/kernel"] == P(None, "model")
    assert specs["layers/mlp/gate_proj/kernel"] == P(None, None, "model")
    assert specs["layers/mlp/down_proj/kernel"] == P(None, "model")
    assert specs["embed/embedding"] == P("model") and specs["lm_head/kernel"] == P(None, "model")
    assert specs["layers/input_norm/scale"] == P() and specs["final_norm/scale"] == P()
    cache = partition_spec(CACHE_AXES, (32, 16, 8, 2048, 128), LLAMA3_8B, AbstractMesh((2, 4), ("data", "model")))
    assert cache == P(None, "data", "model")


def test_smollm2_replicates_its_9_heads_and_3_kv_heads_but_splits_mlp_and_vocabulary():
    """A model axis of 2, 4 or 8 divides neither 9 heads nor 3 KV heads: the attention projections and the
    KV cache are replicated (never padded: padding heads would change every layer's arithmetic); a model
    axis of 3 splits both."""
    for ways in (2, 4, 8):
        mesh = AbstractMesh((1, ways), ("data", "model"))
        specs = _specs(SMOLLM2_135M, mesh)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert specs[f"layers/attn/{name}/kernel"] == P(), (ways, name)
        assert specs["layers/mlp/up_proj/kernel"] == P(None, None, "model")  # 1536 units
        assert specs["embed/embedding"] == P("model")  # 49152 entries
        assert partition_spec(CACHE_AXES, (30, 16, 3, 2048, 64), SMOLLM2_135M, mesh) == P()
    specs = _specs(SMOLLM2_135M, AbstractMesh((1, 3), ("data", "model")))
    assert specs["layers/attn/q_proj/kernel"] == P(None, None, "model")
    assert specs["layers/attn/k_proj/kernel"] == P(None, None, "model")


def test_query_heads_split_only_with_their_kv_heads():
    """8 heads and 4 KV heads: split over a model axis of 4 (two heads and one KV head per device), not over 8,
    where the KV heads would not divide (each device keeps whole GQA groups; module docstring)."""
    assert _specs(QWEN3_LIKE, AbstractMesh((1, 4), ("data", "model")))["layers/attn/q_proj/kernel"] == P(None, None, "model")
    eight = _specs(QWEN3_LIKE, AbstractMesh((1, 8), ("data", "model")))
    assert eight["layers/attn/q_proj/kernel"] == P() and eight["layers/attn/k_proj/kernel"] == P()
    assert eight["layers/mlp/gate_proj/kernel"] == P(None, None, "model")


def test_every_parameter_of_every_layout_has_an_entry():
    """Biases and q/k norms (Qwen), float and quantised layouts: no parameter is missing from the table, and
    quantised leaves (the CPU kernel's opaque calls) are replicated."""
    mesh = AbstractMesh((2, 4), ("data", "model"))
    specs = _specs(QWEN3_LIKE, mesh)
    assert specs["layers/attn/q_proj/bias"] == P(None, "model")
    assert specs["layers/attn/q_norm/scale"] == P()
    quantised = quantize_params(jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), param_shapes(QWEN3_LIKE)))
    specs = _specs(QWEN3_LIKE.replace(weights="int8"), mesh, quantised)
    assert any(name.endswith("/codes") for name in specs)
    for name, spec in specs.items():
        if name.endswith(("/codes", "/offset")) or (name.endswith("/scale") and "norm" not in name):
            assert spec == P(), name


def test_a_shared_expert_splits_like_a_dense_mlp_and_its_gate_is_replicated():
    """Qwen2-MoE: experts over ``expert`` and their units over ``model``; the shared expert's units over
    ``model`` like a dense MLP's; the router and the shared expert's one-output gate whole."""
    cfg = QWEN3_LIKE.replace(architecture="qwen2_moe", qk_norm=False, num_experts=4, experts_per_token=2,
                             expert_intermediate_size=128, shared_expert_intermediate_size=256)
    specs = _specs(cfg, AbstractMesh((1, 2, 2), ("data", "model", "expert")))
    assert specs["layers/mlp/experts/gate_proj"] == P(None, "expert", None, "model")
    assert specs["layers/mlp/shared/gate_proj/kernel"] == P(None, None, "model")
    assert specs["layers/mlp/shared/down_proj/kernel"] == P(None, "model")
    assert specs["layers/mlp/shared_gate/kernel"] == P() and specs["layers/mlp/router/kernel"] == P()


def test_a_decode_call_on_a_data_mesh_lays_rows_out_shard_by_shard():
    """8 slots over data=2: slots 0-3 on shard 0, 4-7 on shard 1; free slots are taken alternately; a call's
    rows are local indices per shard (padding: 4, the dropped row) and ``order`` gives each slot's column."""
    shards = DataShards(AbstractMesh((2, 4), ("data", "model")), 8, lambda leaf: P())
    assert shards.slot_order() == (0, 4, 1, 5, 2, 6, 3, 7)
    assert shards.bucket_rows([0, 4, 1]) == 2 and shards.bucket_rows([0, 1, 2]) == 3
    rows, order = shards.host_rows([5, 0, 1], 2)
    assert rows.tolist() == [0, 1, 1, 4]  # shard 0: slots 0, 1; shard 1: slot 5, padding
    assert order.tolist() == [2, 0, 1, 3]  # slot 5 -> column 2, slot 0 -> 0, slot 1 -> 1, then the padding column
    with pytest.raises(MeshError, match="cannot be split"):
        DataShards(AbstractMesh((4, 2), ("data", "model")), 6, lambda leaf: P())


def mesh_worker(*args: str, env: dict | None = None) -> dict:
    """``tests/mesh_worker.py`` in a process with 8 fake CPU devices; its JSON report."""
    env = {**os.environ, **(env or {}),
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}
    result = subprocess.run([sys.executable, "-m", "tests.mesh_worker", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def _check_mesh_contract(report: dict) -> None:
    one = report.pop("data=1,model=1")
    assert one["alone"] == one["loaded"]
    for mesh, run in report.items():
        assert not any(run["cache_gathers"].values()), f"{mesh}: a program gathers the KV cache or pool: {run}"
        assert run["alone"] == run["loaded"], f"{mesh}: a seeded request's bits changed under load"
        assert [t for t, _ in run["alone"]] == [t for t, _ in one["alone"]], mesh
        assert run["pair"] == one["pair"] and len(run["pair"]) == 2, f"{mesh}: an n=2 request's choices differ"
        assert max(abs(a - b) for (_, a), (_, b) in zip(run["alone"], one["alone"])) <= 1e-4, mesh


VARIANTS = {  # worker arguments; each mesh costs ~10 s of compiling on 2 cores, so the variants take fewer
    "kernels": [],
    "xla-attention": ["--xla-attention", "--meshes", "data=2,model=4", "data=4,model=2"],
    "int8-weights": ["--weights", "int8", "--meshes", "data=2,model=4"],
    "experts": ["--moe", "--meshes", "expert=4", "data=2,model=2,expert=2"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_serving_on_every_mesh_keeps_the_seed_contract(tmp_path, variant):
    """Meshes 1x8, 2x4, 4x2 and 8x1 of fake devices: the same tokens as one device (logprobs within 1e-4), the
    same bits alone and under load, and the params and cache laid out as the rules say. ``kernels``: the CPU
    kernels (run replicated by XLA); ``xla-attention``: the XLA formulation GPUs and TPUs run, partitioned
    (on the two meshes that split heads); ``int8-weights``: quantised projections (replicated); ``experts``: a
    tiny Qwen3-MoE with its experts split over an ``expert`` axis (routing reads each row's own scores)."""
    report = mesh_worker("tiny", str(tmp_path), *VARIANTS[variant])
    if variant == "experts":  # 4 experts of 48 units: over expert=4, and over expert=2 x model=2
        assert report["expert=4"]["experts"] == {"spec": [None, "expert"], "shard": [3, 1, 64, 48], "devices": 4}
        assert report["data=2,model=2,expert=2"]["experts"] == {"spec": [None, "expert", None, "model"],
                                                                "shard": [3, 2, 64, 24], "devices": 8}
    elif variant != "int8-weights":
        layout = report["data=2,model=4"]["layout"]  # 4 heads and 2 KV heads over model=4: attention replicated
        assert layout["q_proj"]["spec"] == [] and layout["k_proj"]["spec"] == []
        assert layout["down_proj"] == {"spec": [None, "model"], "shard": [3, 40, 64], "devices": 8}
        assert layout["cache"] == {"spec": [None, "data"], "shard": [3, 4, 2, 64, 16], "devices": 8}
        layout = report["data=4,model=2"]["layout"]  # over model=2: two heads and one KV head per device
        assert layout["q_proj"] == {"spec": [None, None, "model"], "shard": [3, 64, 32], "devices": 8}
        assert layout["k_proj"] == {"spec": [None, None, "model"], "shard": [3, 64, 16], "devices": 8}
        # the CPU attention kernel reads every KV head, so its cache keeps them; the XLA formulation splits them
        assert layout["cache"]["spec"] == ([None, "data"] if variant == "kernels" else [None, "data", "model"])
    _check_mesh_contract(report)


def test_a_checkpoint_saved_from_one_mesh_restores_into_another_shard_by_shard(tmp_path):
    """orbax params saved from a 1x8 mesh, restored into 4x2: every array laid out as the rules say, the same
    values, and the restore path never makes a host array bigger than one shard (no host holds the params)."""
    report = mesh_worker("roundtrip", str(tmp_path))
    assert report["layouts_as_rules"] and report["values_equal"]
    assert {"q_proj", "down_proj", "embed"} <= set(report["split"])  # 4 heads / 2, MLP / 2, vocabulary / 2
    assert report["largest_host_array"] <= report["largest_shard"] < report["largest_split_array"]
