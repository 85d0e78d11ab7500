"""Logit processors as pure, jittable, per-row functions.

Every setting is a ``[B]`` array (one value per batch row), never a static argument, so rows with
different settings share one compiled step and changing a value never recompiles. A neutral value
switches a processor off for its row (top_k 0, top_p 1, min_p 0, penalties 0/1, temperature 1).
Masked tokens get ``-inf``, as transformers' warpers do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL-style penalty over ``seen`` tokens (``[B, V]`` bool, prompt and output, as transformers does):
    positive logits are divided by ``penalty``, negative ones multiplied."""
    p = penalty[:, None]
    penalised = jnp.where(logits < 0, logits * p, logits / p)
    return jnp.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: jax.Array, counts: jax.Array, presence: jax.Array, frequency: jax.Array
) -> jax.Array:
    """OpenAI's formula over tokens generated so far: ``logit - count * frequency - (count > 0) * presence``."""
    counts = counts.astype(logits.dtype)
    return logits - counts * frequency[:, None] - (counts > 0).astype(logits.dtype) * presence[:, None]


def apply_allowed_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Keep only tokens whose bit is set in ``bitmask`` ``[B, ceil(V/32)]`` uint32 (bit ``i % 32`` of word ``i // 32``)."""
    vocab = logits.shape[-1]
    ids = jnp.arange(vocab)
    words = jnp.take(bitmask, ids // 32, axis=1)
    allowed = (words >> (ids % 32).astype(jnp.uint32)) & jnp.uint32(1)
    return jnp.where(allowed.astype(bool), logits, NEG_INF)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide by temperature; rows with temperature 0 (greedy) are left as they are."""
    safe = jnp.where(temperature > 0, temperature, 1.0)
    return logits / safe[:, None]


def top_k_mask(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep each row's ``top_k`` largest logits (ties with the k-th kept, as transformers does); 0 = off."""
    vocab = logits.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    descending = -jnp.sort(-logits, axis=-1)
    threshold = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    return jnp.where(logits < threshold, NEG_INF, logits)


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filtering as transformers' ``TopPLogitsWarper``: drop the low tail whose cumulative
    probability is <= 1 - top_p, always keeping the most likely token; top_p 1 = off."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted = remove_sorted.at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    remove = remove & (top_p < 1.0)[:, None]
    return jnp.where(remove, NEG_INF, logits)


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below ``min_p`` times the top token's; 0 = off."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    remove = probs < threshold
    top = jnp.argmax(probs, axis=-1)
    remove = remove.at[jnp.arange(logits.shape[0]), top].set(False)
    return jnp.where(remove, NEG_INF, logits)
