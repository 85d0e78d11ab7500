"""Sums whose bits do not depend on how many rows are in the batch.

XLA:CPU picks a reduction strategy from the whole operand's shape, so the same row summed inside a batch
of 2 rows and inside a batch of 16 can round differently (measured, jax 0.10.2: a mean over 576 features
differs for 2-7 rows; a sum over 128 attention scores for 1-3 rows of 9 heads). The decode path runs a
row in buckets of different sizes and the seed contract needs its bits unchanged, so its sums are written
as a fixed tree of element-wise adds instead: halve the axis and add the halves until one element is left.
Element-wise adds are computed independently per element, so a row's result is the same expression
whatever else is in the batch. (Maxima need nothing: ``max`` is exact in any order.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Sum over ``axis`` in a fixed order: add halves while the length is even, then the odd number of
    pieces left, left to right (576 = 64 x 9: six halvings, then nine pieces)."""
    axis = axis % x.ndim
    while x.shape[axis] > 1 and x.shape[axis] % 2 == 0:
        half = x.shape[axis] // 2
        x = jax.lax.slice_in_dim(x, 0, half, axis=axis) + jax.lax.slice_in_dim(x, half, 2 * half, axis=axis)
    total = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    for i in range(1, x.shape[axis]):
        total = total + jax.lax.slice_in_dim(x, i, i + 1, axis=axis)
    return total if keepdims else jnp.squeeze(total, axis)


def tree_mean(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    return tree_sum(x, axis, keepdims) / x.shape[axis]


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.log_softmax`` with a batch-invariant sum."""
    shifted = x - jax.lax.stop_gradient(x.max(axis=axis, keepdims=True))
    return shifted - jnp.log(tree_sum(jnp.exp(shifted), axis, keepdims=True))


def logsumexp(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """``jax.nn.logsumexp`` with a batch-invariant sum (``-inf`` rows stay ``-inf``)."""
    top = x.max(axis=axis, keepdims=True)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    out = jnp.log(tree_sum(jnp.exp(x - safe), axis, keepdims=True)) + safe
    return out if keepdims else jnp.squeeze(out, axis)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    shifted = jnp.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / tree_sum(shifted, axis, keepdims=True)
