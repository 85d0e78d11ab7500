"""Logits parity with transformers (PyTorch, float32, CPU) through the safetensors importer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxchat.checkpoints.hf_import import load_hf_folder
from flaxchat.model.transformer import Transformer, init_cache
from tests.hf_reference import TINY_MODELS, make_tiny_model

PROMPT = [3, 17, 250, 9, 41, 41, 100, 7, 2, 199, 64, 5, 88, 301, 12, 6]
TOLERANCE = 1e-4


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request, tmp_path):
    torch_model = make_tiny_model(request.param, tmp_path)
    cfg, params = load_hf_folder(tmp_path)
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    return cfg, params, reference


def test_prompt_logits_match(tiny):
    cfg, params, reference = tiny
    tokens = jnp.asarray([PROMPT], jnp.int32)
    positions = jnp.arange(len(PROMPT), dtype=jnp.int32)[None]
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, init_cache(cfg, 1, 32))
    diff = np.abs(np.asarray(logits[0]) - reference).max()
    assert diff <= TOLERANCE, f"max abs logits difference {diff}"


def test_cached_token_by_token_logits_match(tiny):
    """Prefill half the prompt, then feed one token at a time through the KV cache."""
    cfg, params, reference = tiny
    model = Transformer(cfg)
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c))
    cache = init_cache(cfg, 1, 32)
    half = len(PROMPT) // 2
    logits, cache = step(params, jnp.asarray([PROMPT[:half]]), jnp.arange(half)[None], cache)
    got = [np.asarray(logits[0])]
    for pos in range(half, len(PROMPT)):
        logits, cache = step(params, jnp.asarray([[PROMPT[pos]]]), jnp.asarray([[pos]]), cache)
        got.append(np.asarray(logits[0]))
    diff = np.abs(np.concatenate(got) - reference).max()
    assert diff <= TOLERANCE, f"max abs logits difference {diff}"


def test_bfloat16_compute_and_params(tmp_path):
    """bfloat16 storage + compute runs through prefill and cache and stays close to the float32 reference."""
    torch_model = make_tiny_model("qwen3", tmp_path)
    cfg, params = load_hf_folder(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    cache = init_cache(cfg, 1, 32)
    assert cache.dtype == jnp.bfloat16
    logits, cache = Transformer(cfg).apply({"params": params}, jnp.asarray([PROMPT]),
                                           jnp.arange(len(PROMPT))[None], cache)
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits[0]) - reference).max() <= 0.05 * np.abs(reference).max()
