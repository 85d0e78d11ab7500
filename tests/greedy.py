"""A greedy reference without the engine or a KV cache: each token is the argmax of a forward pass over the
whole sequence so far (padded to one fixed length, so one compile serves every step)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.config import ModelConfig
from flaxchat.model.transformer import Transformer, init_cache


def greedy_without_cache(cfg: ModelConfig, params: Any, prompt: list[int], max_tokens: int,
                         stop_ids: frozenset[int] = frozenset()) -> list[int]:
    length = len(prompt) + max_tokens
    model = Transformer(cfg)

    @jax.jit
    def last_logits(tokens, last):
        logits, _ = model.apply({"params": params}, tokens, jnp.arange(length, dtype=jnp.int32)[None],
                                init_cache(cfg, 1, length), logit_indices=last.reshape(1, 1))
        return logits[0, 0]

    sequence = list(prompt)
    for _ in range(max_tokens):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(sequence)] = sequence
        token = int(jnp.argmax(last_logits(jnp.asarray(padded), jnp.int32(len(sequence) - 1))))
        sequence.append(token)
        if token in stop_ids:
            break
    return sequence[len(prompt):]
