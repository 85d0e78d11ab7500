"""A first, single-sequence generation path: bucketed prefill, then a jitted decode step.

Randomness follows the reproducibility contract in DESIGN.md: the request key is
``jax.random.key(seed)``, choice ``i`` uses ``fold_in(key, i)`` and the ``t``-th generated token
(``t`` counted from 0 within the completion) uses ``fold_in(choice_key, t)``. Temperature travels as
an array, never a static argument, so changing it never recompiles. This is the plain single-sequence
path (CLI ``generate`` and the greedy reference in tests); serving goes through ``sampling.engine``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.config import ModelConfig
from flaxchat.model.transformer import KVCache, Transformer, init_cache
from flaxchat.sampling.processors import categorical
from flaxchat.sampling.sampler import choice_key


def bucket_length(n: int, smallest: int = 16) -> int:
    """Next power of two >= n (at least ``smallest``): a few static shapes cover every prompt."""
    size = smallest
    while size < n:
        size *= 2
    return size


def token_key(seed: int, choice: int, t: int) -> jax.Array:
    """The PRNG key of the ``t``-th generated token of choice ``choice`` of a request seeded ``seed``."""
    return jax.random.fold_in(choice_key(seed, choice), t)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array) -> jax.Array:
    """Per-row sampling: greedy (argmax) where ``temperature == 0``, else softmax(logits / T) sampling.

    ``logits`` ``[B, V]`` float32, ``keys`` ``[B]`` typed keys, ``temperature`` ``[B]`` float32.
    """
    greedy = jnp.argmax(logits, axis=-1)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_t[:, None]
    sampled = categorical(keys, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()


class SimpleGenerator:
    """Generate one sequence at a time; jitted prefill per bucket and one jitted decode step.

    ``self`` is a static jit argument hashed by identity, so each generator compiles its own steps once.
    """

    def __init__(self, cfg: ModelConfig, params: Any, kv_dtype: str | None = None):
        self.cfg = cfg
        self.params = params
        self.kv_dtype = kv_dtype  # KV cache storage (model/kv_cache.py); default the compute dtype
        self.model = Transformer(cfg)

    @partial(jax.jit, static_argnums=0, donate_argnums=(4,))
    def _prefill(self, params, tokens, length, cache: KVCache, key, temperature):
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        last = (length - 1).reshape(1, 1)
        logits, cache = self.model.apply({"params": params}, tokens, positions, cache, logit_indices=last)
        return sample_tokens(logits[:, 0], key[None], temperature[None]), cache

    @partial(jax.jit, static_argnums=0, donate_argnums=(4,))
    def _decode(self, params, token, position, cache: KVCache, key, temperature):
        logits, cache = self.model.apply({"params": params}, token[:, None], position.reshape(1, 1), cache)
        return sample_tokens(logits[:, 0], key[None], temperature[None]), cache

    def generate(self, prompt: list[int], settings: GenerationSettings) -> Iterator[int]:
        """Yield generated token ids until a stop id, ``max_tokens`` or the context limit."""
        if not prompt:
            raise ValueError("the prompt is empty")
        limit = self.cfg.max_position_embeddings
        if len(prompt) >= limit:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {limit}")
        budget = min(settings.max_tokens, limit - len(prompt))
        cache_len = min(bucket_length(len(prompt) + budget), limit)
        padded = np.zeros((1, bucket_length(len(prompt))), np.int32)
        padded[0, : len(prompt)] = prompt
        cache = init_cache(self.cfg, 1, cache_len, self.kv_dtype)
        temperature = jnp.float32(settings.temperature)
        token, cache = self._prefill(
            self.params, jnp.asarray(padded), jnp.int32(len(prompt)), cache,
            token_key(settings.seed, 0, 0), temperature,
        )
        for t in range(budget):
            token_id = int(token[0])
            yield token_id
            if token_id in settings.stop_ids or t + 1 == budget:
                return
            token, cache = self._decode(
                self.params, token, jnp.int32(len(prompt) + t), cache,
                token_key(settings.seed, 0, t + 1), temperature,
            )

