"""Mixtures of experts (Qwen3-MoE, Mixtral): routing, the engine's greedy tokens against transformers', and the
seed contract (a token's routing reads only its own row). Logits parity, with and without the cache, is in
``tests/test_parity_hf.py`` (the tiny models of ``tests/hf_reference.py``); meshes with an ``expert`` axis in
``tests/test_sharding.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxchat.model.config import ModelConfig, UnsupportedModelError
from flaxchat.model.quant import prepare_weights
from flaxchat.model.experts import route
from flaxchat.sampling.engine import Engine, EngineConfig
from flaxchat.sampling.params import SamplingParams
from tests.engine_fixtures import tiny_moe_model
from tests.hf_reference import make_tiny_model

PROMPT = [3, 17, 250, 9, 41, 41, 100, 7, 2, 199, 64, 5]


def _moe_config(**changes) -> ModelConfig:
    return ModelConfig(architecture="qwen3_moe", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=16, num_experts=6,
                       experts_per_token=2, expert_intermediate_size=4, **changes)


@pytest.mark.parametrize("normalise", [True, False])
def test_routing_keeps_the_top_experts_of_a_float32_softmax(normalise):
    cfg = _moe_config(norm_topk_prob=normalise)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    router = jax.random.normal(jax.random.key(1), (8, 6))
    weights = np.asarray(route(x, router, cfg))
    probs = np.asarray(jax.nn.softmax(x @ router, axis=-1))
    for row, p in zip(weights, probs):
        chosen = np.argsort(-p)[:2]
        assert set(np.flatnonzero(row)) == set(chosen)
        expected = p[chosen] / (p[chosen].sum() if normalise else 1.0)
        np.testing.assert_allclose(row[chosen], expected, rtol=1e-6)
    # a row's weights do not depend on the other rows
    np.testing.assert_array_equal(np.asarray(route(x[2:3], router, cfg)), weights[2:3])


def test_the_config_reads_experts_and_refuses_what_it_cannot_run():
    hf = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=8,
              num_experts_per_tok=2, moe_intermediate_size=4, norm_topk_prob=False)
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_intermediate_size, cfg.norm_topk_prob) == (8, 2, 4, False)
    assert cfg.qk_norm
    with pytest.raises(UnsupportedModelError, match="dense MLP layers"):
        ModelConfig.from_hf({**hf, "mlp_only_layers": [0]})
    mixtral = ModelConfig.from_hf({**hf, "architectures": ["MixtralForCausalLM"], "num_experts": None,
                                   "num_local_experts": 4, "sliding_window": 5})
    assert (mixtral.num_experts, mixtral.expert_intermediate_size, mixtral.norm_topk_prob) == (4, 16, True)
    assert mixtral.sliding_windows == (5, 5) and not mixtral.qk_norm
    with pytest.raises(ValueError, match="float weights only"):
        prepare_weights(cfg, None, "int8")


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_engine_greedy_tokens_equal_transformers(tmp_path, kind):
    cfg, params, tokenizer = tiny_moe_model(tmp_path, kind)
    reference = make_tiny_model(kind, tmp_path / "reference")  # the same seed: the same weights
    with torch.no_grad():
        expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    with Engine(cfg, params, tokenizer, EngineConfig(slots=2, max_len=64, warmup=False, prefix_cache_mb=0)) as engine:
        events = engine.submit(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)).result()[0]
    assert [e.token_id for e in events if e.token_id is not None] == expected


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_a_seeded_request_keeps_its_bits_among_others(tmp_path, kind):
    """Alone, then among three other requests (other row buckets, other experts chosen beside it; Qwen2-MoE's
    shared expert and its gate on every row): the same tokens and logprobs, bit for bit."""
    cfg, params, tokenizer = tiny_moe_model(tmp_path, kind)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, seed=11, logprobs=True)
    with Engine(cfg, params, tokenizer, EngineConfig(slots=4, max_len=64, warmup=False)) as engine:
        alone = engine.submit(PROMPT, seeded).result()[0]
        others = [engine.submit([5 + i] * (6 + 3 * i), SamplingParams(max_tokens=20, temperature=1.0, seed=i))
                  for i in range(3)]
        loaded = engine.submit(PROMPT, seeded).result()[0]
        for handle in others:
            handle.result()
    assert [(e.token_id, e.logprob) for e in loaded] == [(e.token_id, e.logprob) for e in alone]
    assert len([e for e in alone if e.token_id is not None]) == 16
    assert jnp.asarray([e.logprob for e in alone if e.logprob is not None]).dtype == jnp.float32


def test_experts_go_through_the_native_checkpoint_format(tmp_path):
    """orbax save and restore (what the model store keeps): the config's expert fields and the stacked experts
    come back as they went."""
    from flaxchat.checkpoints.orbax_io import restore_params, save_params

    cfg, params, _ = tiny_moe_model(tmp_path)
    save_params(tmp_path / "params", params)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    restored = restore_params(tmp_path / "params", again)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_tiny_mixture_of_experts_answers_a_tool_call_through_http(tmp_path):
    """The real server over an engine on a tiny Qwen3-MoE, the official client: a required tool call comes back
    whole (arguments valid against the tool's schema), streamed and not streamed alike."""
    import json

    import jsonschema

    from flaxchat.chat.request import ServedModel
    from flaxchat.serve.app import ServerSettings, create_app
    from flaxchat.serve.server import BackgroundServer
    from tests.gguf_writer import CHAT_TEMPLATE
    from tests.server_fixtures import openai_client
    from tests.test_tools import ASK, SCHEMAS, TOOLS

    cfg, params, tokenizer = tiny_moe_model(tmp_path, context=2048)
    engine = Engine(cfg, params, tokenizer, EngineConfig(slots=2, max_len=2048, warmup=False)).start()
    served = ServedModel("tiny-moe", engine, tokenizer, CHAT_TEMPLATE, "fp_test")
    server = BackgroundServer(create_app(served, ServerSettings())).start()
    try:
        client = openai_client(server)
        request = dict(model="tiny-moe", messages=ASK, tools=TOOLS, tool_choice="required", seed=3, max_tokens=300)
        choice = client.chat.completions.create(**request).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        streamed = {}
        for chunk in client.chat.completions.create(stream=True, **request):
            for piece in chunk.choices[0].delta.tool_calls or ():
                entry = streamed.setdefault(piece.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or piece.function.name
                entry["arguments"] += piece.function.arguments or ""
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
            [(e["name"], e["arguments"]) for _, e in sorted(streamed.items())]
    finally:
        server.stop()
        engine.stop()
