"""``flaxchat plan`` (``flaxchat/plan.py``): the capacity planner agrees with the sharding rules the server
uses, with the models' published sizes, and ``docs/SCALING.md`` is its output."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh

from flaxchat.cli import main
from flaxchat.model.config import ModelConfig
from flaxchat.model.sharding import param_axes, partition_spec
from flaxchat.model.transformer import param_shapes
from flaxchat.plan import (DEVICES, KNOWN, USABLE_MEMORY, make_plan, resolve_shape, scaling_document,
                           serve_command)

ROOT = Path(__file__).resolve().parent.parent


def _bytes_per_device(cfg: ModelConfig, mesh: AbstractMesh, bytes_per_weight: float) -> float:
    """Every parameter of the real params pytree, divided as model/sharding.py's rules divide it."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        spec = partition_spec(param_axes(path, leaf.ndim), leaf.shape, cfg, mesh)
        ways = math.prod(mesh.shape[axis] for axis in spec if axis)
        total += math.prod(leaf.shape) / ways
    return total * bytes_per_weight


@pytest.mark.parametrize("model", ["llama-3-8b", "qwen3-32b"])
@pytest.mark.parametrize("mesh", [(1, 8), (2, 4), (1, 3)])
def test_weights_per_device_follow_the_servers_sharding_rules(model, mesh):
    cfg = ModelConfig.from_hf(KNOWN[model])
    plan = make_plan(resolve_shape(model), DEVICES["h100"], dict(zip(("data", "model"), mesh)))
    expected = _bytes_per_device(cfg, AbstractMesh(mesh, ("data", "model")), 2.0)
    assert plan.weight_bytes == pytest.approx(expected, rel=1e-9)


def test_parameter_counts_match_the_published_sizes():
    """Llama-3-8B 8.03 B, Llama-3-70B 70.6 B, Qwen3-32B 32.8 B, Qwen3-30B-A3B 30.5 B with 3.3 B active (its
    card counts the embedding lookup; the plan's active count is what a token multiplies)."""
    sizes = {name: make_plan(resolve_shape(name), DEVICES["h100"], {"model": 8}) for name in KNOWN}
    assert sizes["llama-3-8b"].params / 1e9 == pytest.approx(8.03, abs=0.01)
    assert sizes["llama-3-70b"].params / 1e9 == pytest.approx(70.55, abs=0.05)
    assert sizes["qwen3-32b"].params / 1e9 == pytest.approx(32.8, abs=0.1)
    moe = sizes["qwen3-30b-a3b"]
    assert moe.params / 1e9 == pytest.approx(30.5, abs=0.1)
    assert (moe.active_params + moe.shape.vocab * moe.shape.hidden) / 1e9 == pytest.approx(3.35, abs=0.05)


def test_the_largest_cache_fits_and_one_more_token_does_not():
    for name in KNOWN:
        for device in DEVICES.values():
            plan = make_plan(resolve_shape(name), device, {"data": 2, "model": 4})
            free = device.memory_gb * 1e9 * USABLE_MEMORY - plan.weight_bytes
            if plan.tokens_per_shard == 0:
                assert free < plan.kv_bytes_per_token
                continue
            assert plan.tokens_per_shard * plan.kv_bytes_per_token <= free
            assert (plan.tokens_per_shard + 1) * plan.kv_bytes_per_token > free


def test_decode_rooflines_grow_with_rows_and_a_lone_row_is_memory_bound():
    plan = make_plan(resolve_shape("llama-3-8b"), DEVICES["h100"], {"model": 8})
    rates = [r["tokens_per_s"] for r in plan.rows.values()]
    assert rates == sorted(rates) and len(rates) >= 4
    assert plan.rows[1]["bound"] == "memory"
    # one row reads each device's weights and its cache once: the bandwidth bound, by hand
    position = 4096
    seconds = (plan.weight_bytes + position * plan.kv_bytes_per_token) / (DEVICES["h100"].bandwidth_gbs * 1e9)
    assert plan.rows[1]["tokens_per_s"] == pytest.approx(1 / seconds, rel=1e-9)


def test_a_mixture_of_experts_reads_more_experts_as_rows_grow():
    plan = make_plan(resolve_shape("qwen3-30b-a3b"), DEVICES["h100"], {"data": 2, "model": 4})
    memory = [r["memory_ms"] for r in plan.rows.values()]
    assert memory == sorted(memory)
    assert serve_command(plan).startswith("flaxchat serve ./qwen3-30b-a3b --mesh data=2,model=4")


def test_scaling_doc_is_the_planners_output():
    assert (ROOT / "docs" / "SCALING.md").read_text() == scaling_document(), \
        "regenerate: python -c 'from flaxchat.plan import scaling_document; print(scaling_document(), end=\"\")' > docs/SCALING.md"


def test_plan_command(capsys):
    assert main(["plan", "llama-3-8b", "--mesh", "data=2,model=4", "--device", "v5e"]) == 0
    out = capsys.readouterr().out
    assert "flaxchat serve ./llama-3-8b --mesh data=2,model=4 --dtype bfloat16" in out
    assert "TPU v5e" in out and "| 1 |" in out
    assert main(["plan", "no-such-model"]) == 1
    assert main(["plan", "llama-3-8b", "--device", "tpu9"]) == 1
    assert main(["plan", "llama-3-8b", "--mesh", "tensor=2"]) == 1


def test_a_mixture_of_experts_plan_by_hand():
    """Qwen3-30B-A3B on 8 x H100, model=8, bfloat16, worked out by hand: 4 KV heads do not divide 8, so
    attention is whole on each device; each expert's 768 units and the vocabulary split 8 ways."""
    plan = make_plan(resolve_shape("qwen3-30b-a3b"), DEVICES["h100"], {"model": 8}, context=4096)
    attention = 2048 * (2 * 32 * 128 + 2 * 4 * 128)  # q, o; k, v
    experts = 3 * 2048 * 768 * 128 // 8
    per_layer = attention + experts + 2048 * 128 + 2 * 2048 + 2 * 128  # + router, norms, q/k norms
    params = 48 * per_layer + 151936 * 2048 * 2 // 8 + 2048  # + embedding and LM head (split), final norm
    assert plan.weight_bytes == 2 * params == 9_240_866_816
    assert plan.kv_bytes_per_token == 2 * 48 * 4 * 128 * 2  # keys and values, 48 layers, 4 KV heads, bf16
    # one row at 4,096 positions reads the 8 experts it routes to (of 128) and its cache
    one_expert = 3 * 2048 * 768 * 48 * 2 // 8
    read = 2 * params - 120 * one_expert + 4096 * plan.kv_bytes_per_token
    assert plan.rows[1]["memory_ms"] == pytest.approx(read / 3350e9 * 1e3, rel=1e-12)
    assert round(plan.rows[1]["tokens_per_s"]) == round(3350e9 / read) == 1176


QWEN15_MOE = dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_size=2048,
                  intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  vocab_size=151936, max_position_embeddings=8192, num_experts=60, num_experts_per_tok=4,
                  moe_intermediate_size=1408, shared_expert_intermediate_size=5632, tie_word_embeddings=False)


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)])
def test_a_shared_expert_is_planned_as_the_server_holds_it(mesh):
    """Qwen1.5-MoE-A2.7B (Qwen2-MoE: 60 experts, 4 chosen, a shared expert of 5,632 units under a gate):
    14.3 B parameters, 2.7 B active with the embedding lookup as its card counts them; per device, what the
    server's rules make of the real params pytree (q/k/v biases aside: the planner leaves biases out)."""
    from flaxchat.plan import Shape

    shape = Shape.from_hf("qwen1.5-moe-a2.7b", QWEN15_MOE)
    plan = make_plan(shape, DEVICES["h100"], dict(zip(("data", "model"), mesh)))
    assert plan.params / 1e9 == pytest.approx(14.3, abs=0.05)
    assert (plan.active_params + shape.vocab * shape.hidden) / 1e9 == pytest.approx(2.7, abs=0.02)
    cfg = ModelConfig.from_hf(QWEN15_MOE)
    assert cfg.shared_expert_intermediate_size == 5632 and cfg.qkv_bias and not cfg.norm_topk_prob
    expected = _bytes_per_device(cfg, AbstractMesh(mesh, ("data", "model")), 2.0)
    assert plan.weight_bytes == pytest.approx(expected, rel=1e-4)  # the biases' 0.01 % aside
