"""Prompt scoring (``prompt_logprobs``) through the real engine: each prompt token's log-probability against
transformers, and a scored request's reply and scores keep their bits (with or without scoring, cached
prefixes, other requests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from flaxchat.sampling.engine import Engine, EngineConfig
from flaxchat.sampling.params import SamplingParams
from tests.engine_fixtures import tiny_model, with_weights

MAX_LEN = 256
# The default model's widths with two layers (float32 chunks keep their bits from 64 rows at these widths).
REAL_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   num_hidden_layers=2)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True, logprobs=True, top_logprobs=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("scoring")


@pytest.fixture(scope="module")
def model(folder):
    return tiny_model(folder, context=MAX_LEN, shape=REAL_WIDTHS)


@pytest.fixture(scope="module")
def engines(model):
    started = {}

    def get(weights: str, kv_dtype: str | None = None) -> Engine:
        if (weights, kv_dtype) not in started:
            cfg, params, tokenizer = with_weights(model, weights)
            config = EngineConfig(slots=4, max_len=MAX_LEN, prefill_chunk=32, largest_prefill_bucket=64,
                                  prefix_block=16, kv_dtype=kv_dtype)
            started[(weights, kv_dtype)] = Engine(cfg, params, tokenizer, config).start()
        return started[(weights, kv_dtype)]

    yield get
    for engine in started.values():
        engine.stop()


def _prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 250, length).tolist()


def test_prompt_scores_match_transformers(engines, folder):
    """150 tokens (three scoring chunks): every token's log-probability within 1e-4 of transformers'
    float32 log_softmax, and the same five most likely alternatives."""
    prompt = _prompt(150)
    handle = engines("float32").submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=5))
    (events,) = handle.result().values()
    assert [e.finish_reason for e in events] == ["length"] and events[0].token_id is None
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder / "hf")(torch.tensor([prompt])).logits[0]
    reference = torch.log_softmax(logits.double(), dim=-1).numpy()
    scores = handle.prompt_logprobs
    assert [s.token_id for s in scores] == prompt and scores[0].logprob is None
    got = np.array([s.logprob for s in scores[1:]])
    want = reference[np.arange(len(prompt) - 1), prompt[1:]]
    assert np.abs(got - want).max() <= 1e-4
    for i, score in enumerate(scores[1:]):
        assert [t.token_id for t in score.top_logprobs] == np.argsort(-reference[i])[:5].tolist(), i
        np.testing.assert_allclose([t.logprob for t in score.top_logprobs], np.sort(reference[i])[::-1][:5], atol=1e-4)


def _run(engine: Engine, prompt: list[int], params: SamplingParams):
    handle = engine.submit(prompt, params)
    events = handle.result()[0]
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None], handle


@pytest.mark.parametrize("weights,kv_dtype", [("float32", None), ("int4", "int8")])
def test_a_scored_request_keeps_its_bits(engines, weights, kv_dtype):
    """The reply is bit-identical with and without scoring; the scores are bit-identical cold, with the
    prompt's blocks in the prefix cache (scoring computes every token anyway) and under load."""
    from dataclasses import replace

    engine = engines(weights, kv_dtype)
    prompt = _prompt(100, seed=1)
    scored = replace(SEEDED, prompt_logprobs=3)
    engine.prefix.clear()
    plain, _ = _run(engine, prompt, SEEDED)
    reply, cold = _run(engine, prompt, scored)  # the prompt's blocks are cached by now
    assert reply == plain and cold.cached_tokens == 0 and len(cold.prompt_logprobs) == len(prompt)
    others = [engine.submit(_prompt(n, seed=10 + n), SamplingParams(max_tokens=30, seed=n, ignore_eos=True))
              for n in (120, 40, 70)]
    loaded_reply, loaded = _run(engine, prompt, scored)
    for other in others:
        other.result()
    assert loaded_reply == plain and loaded.prompt_logprobs == cold.prompt_logprobs
    assert _no_new_compiles(engine, prompt, scored)  # the scoring program was compiled at warm-up


def _no_new_compiles(engine: Engine, prompt: list[int], params: SamplingParams) -> bool:
    before = engine.compile_count
    _run(engine, prompt[:30], params)
    return engine.compile_count == before
