"""Logit processors as pure, jittable, per-row functions.

Every setting is a ``[B]`` array (one value per batch row), never a static argument, so rows with
different settings share one compiled step and changing a value never recompiles. A neutral value
switches a processor off for its row (top_k 0, top_p 1, min_p 0, penalties 0/1, temperature 1).
Masked tokens get ``-inf``, as transformers' warpers do.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flaxchat.model import reductions

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


# Filters that need each row's logits in order use lax.top_k over this many candidates instead of a full
# vocabulary sort (a full sort costs ~11 ms per row on a 2-core CPU for a 49k vocabulary); they fall back to
# the full sort when a row needs more than the candidates.
CANDIDATES = 1024
# top-p's wider candidate sets, tried in turn before the full sort (a flat distribution's nucleus can hold
# thousands of tokens): lax.top_k of 8,192 of 49,152 takes ~37 ms for 16 rows, the full sort ~177 ms.
TOP_P_STAGES = (CANDIDATES, 8192)


def top_k_mask(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep each row's ``top_k`` largest logits (ties with the k-th kept, as transformers does); 0 = off."""
    vocab = logits.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    used = (top_k > 0) & (top_k < vocab)
    candidates = min(CANDIDATES, vocab)

    def kth_largest(values: jax.Array) -> jax.Array:
        return jnp.take_along_axis(values, (jnp.minimum(k, values.shape[-1]) - 1)[:, None], axis=-1)

    def filtered(logits: jax.Array) -> jax.Array:
        threshold = jax.lax.cond(
            jnp.all(jnp.where(used, k, 0) <= candidates),
            lambda x: kth_largest(jax.lax.top_k(x, candidates)[0]),
            lambda x: kth_largest(-jnp.sort(-x, axis=-1)),
            logits,
        )
        return jnp.where(used[:, None] & (logits < threshold), NEG_INF, logits)

    return jax.lax.cond(jnp.any(used), filtered, lambda x: x, logits)


def _top_p_remove_sorted(ascending_logits: jax.Array, top_p: jax.Array, tail_mass: jax.Array) -> jax.Array:
    """transformers' rule on ascending logits: remove where the cumulative probability <= 1 - top_p
    (``tail_mass``: probability of tokens below the candidates), always keeping the most likely token."""
    probs = jnp.exp(ascending_logits - reductions.logsumexp(ascending_logits, axis=-1, keepdims=True))
    remove = tail_mass[:, None] + jnp.cumsum(probs * (1 - tail_mass[:, None]), axis=-1) <= (1 - top_p)[:, None]
    return remove.at[:, -1].set(False)


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filtering as transformers' ``TopPLogitsWarper``: drop the low tail whose cumulative
    probability is <= 1 - top_p, always keeping the most likely token; top_p 1 = off.

    With a vocabulary larger than ``CANDIDATES`` each row's nucleus is found among its top candidates (the
    mass below them is added first): the smallest of ``TOP_P_STAGES`` that holds it, else by a full sort.
    Each row takes the first stage that holds its own nucleus; a wider stage runs only while some row still
    needs one, and never changes the rows an earlier stage held, so a row's mask does not depend on the
    other rows of its batch.
    """
    batch, vocab = logits.shape
    used = top_p < 1.0
    rows = jnp.arange(batch)[:, None]

    def full_sort(logits: jax.Array) -> jax.Array:
        order = jnp.argsort(logits, axis=-1)
        remove_sorted = _top_p_remove_sorted(jnp.take_along_axis(logits, order, axis=-1), top_p, jnp.zeros(batch))
        return jnp.zeros((batch, vocab), bool).at[rows, order].set(remove_sorted)

    def among_candidates(logits: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
        """Each row's mask from its ``count`` largest logits, and whether the row's nucleus fits among them."""
        values, ids = jax.lax.top_k(logits, count)
        values, ids = values[:, ::-1], ids[:, ::-1]  # ascending
        total = reductions.logsumexp(logits, axis=-1)
        tail = 1 - jnp.exp(reductions.logsumexp(values, axis=-1) - total)
        remove_sorted = _top_p_remove_sorted(values, top_p, tail)
        fits = remove_sorted[:, 0] | ~used  # the least likely candidate is already outside the nucleus
        return jnp.ones((batch, vocab), bool).at[rows, ids].set(remove_sorted), fits

    def widened(count: int | None) -> Callable:
        """The masks with the rows not held yet taken from ``count`` candidates (None: the full sort)."""
        def run(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            remove, fits = state
            wider, wider_fits = (full_sort(logits), jnp.ones(batch, bool)) if count is None else \
                among_candidates(logits, count)
            return jnp.where(fits[:, None], remove, wider), fits | wider_fits
        return run

    def filtered(logits: jax.Array) -> jax.Array:
        if vocab <= CANDIDATES:
            remove = full_sort(logits)
        else:
            stages = [count for count in TOP_P_STAGES if count < vocab]
            state = among_candidates(logits, stages[0])
            for count in [*stages[1:], None]:
                state = jax.lax.cond(jnp.all(state[1]), lambda s: s, widened(count), state)
            remove = state[0]
        return jnp.where(remove & used[:, None], NEG_INF, logits)

    return jax.lax.cond(jnp.any(used), filtered, lambda x: x, logits)


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below ``min_p`` times the top token's; 0 = off.

    Skipped when no row uses it: a softmax and an argmax over the vocabulary cost ~0.4 ms per step at one
    row and ~2 ms at 16 (measured), and with ``min_p`` 0 the filter removes nothing, so rows get the same
    bits either way.
    """

    def filtered(logits: jax.Array) -> jax.Array:
        probs = reductions.softmax(logits, axis=-1)
        threshold = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
        remove = probs < threshold
        top = jnp.argmax(probs, axis=-1)
        remove = remove.at[jnp.arange(logits.shape[0]), top].set(False)
        return jnp.where(remove, NEG_INF, logits)

    return jax.lax.cond(jnp.any(min_p > 0), filtered, lambda x: x, logits)


# Vocabulary block of the two-level draw (``categorical``): a draw costs one random number per block plus
# one per token of the chosen block instead of one per token.
DRAW_BLOCK = 1024


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One token per row from ``softmax(logits)`` (``[B, V]``, one typed key per row), exactly as likely as
    Gumbel-max over the whole row, with ~V/1024 + 1024 random numbers instead of V.

    Gumbel-max needs one threefry draw per vocabulary entry, and on CPU that was the costliest part of a
    decode step (measured: 18.6 ms for 16 rows of a 49k vocabulary, 0.8 ms this way). Here a row first
    draws a block of ``DRAW_BLOCK`` tokens with probability proportional to the block's total mass
    (Gumbel-max over the blocks' logsumexp), then a token within that block (Gumbel-max over its logits):
    P(block) x P(token | block) = P(token). The two stages take disjoint parts of one Gumbel draw (one
    threefry call: half the compile time of splitting the key). Each row is computed on its own (per-row
    keys, batch-invariant sums), so a row's draw does not depend on the other rows.
    """
    batch, vocab = logits.shape
    blocks = -(-vocab // DRAW_BLOCK)
    grouped = jnp.pad(logits, ((0, 0), (0, blocks * DRAW_BLOCK - vocab)), constant_values=NEG_INF)
    grouped = grouped.reshape(batch, blocks, DRAW_BLOCK)
    block_mass = reductions.logsumexp(grouped, axis=-1)  # [B, blocks]

    def draw(key: jax.Array, mass: jax.Array, row: jax.Array) -> jax.Array:
        noise = jax.random.gumbel(key, (blocks + DRAW_BLOCK,))  # one draw: the block's, then the token's
        block = jnp.argmax(mass + noise[:blocks])
        return block * DRAW_BLOCK + jnp.argmax(row[block] + noise[blocks:])

    return jax.vmap(draw)(keys, block_mass, grouped).astype(jnp.int32)
