"""Grouped-query attention of new queries over the KV cache, block by block with an online softmax."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flaxchat.model import kernels
from flaxchat.model.kv_cache import KVCache, dequantize_entries, from_storage
from flaxchat.model.reductions import tree_sum

_MASK_VALUE = -1e30  # finite so a fully masked row cannot produce NaNs

CACHE_CHUNK = 128  # cache positions per attention block


def _chunk_size(length: int) -> int:
    """The largest power of two <= CACHE_CHUNK that divides the cache length (blocks must tile it)."""
    size = CACHE_CHUNK
    while length % size:
        size //= 2
    return size


def read_block(cache: jax.Array, scale: jax.Array | None, layer: jax.Array, rows: jax.Array, start: jax.Array,
               size: int, dtype: Any) -> jax.Array:
    """Positions ``[start, start + size)`` of layer ``layer``'s cache rows ``rows`` (``cache`` is the stacked
    ``[L, slots, kv_heads, S, D]``, ``scale`` its int8 scales or None): ``[len(rows), kv_heads, size, D]``,
    widened to ``dtype``.

    A row index past the cache (a padding row of a decode bucket) is clamped: it reads some real row,
    and its result is discarded.
    """
    kv_heads, dim = cache.shape[2], cache.shape[4]

    def one(row):
        entries = jax.lax.dynamic_slice(cache, (layer, row, 0, start, 0), (1, 1, kv_heads, size, dim))[0, 0]
        if scale is None:
            return from_storage(entries)
        scales = jax.lax.dynamic_slice(scale, (layer, row, 0, start, 0), (1, 1, kv_heads, size, scale.shape[4]))[0, 0]
        return dequantize_entries(entries, scales)

    return jax.vmap(one)(rows).astype(dtype)


def grouped_attention(q, cache: KVCache, layer, rows, positions, window, groups, lengths=None):
    """Causal (optionally sliding-window) GQA of ``q`` over the cache, which already holds this call's keys.

    ``q`` ``[B, T, H, D]`` at ``positions`` ``[B, T]``; ``cache`` the stacked ``[L, slots, KV, S, D]``
    keys and values, of which batch row ``b`` reads layer ``layer``'s row ``rows[b]``; a query at position
    ``p`` sees the row's entries at positions ``<= p`` (and ``> p - window`` when the int32 scalar
    ``window`` is positive). Returns the output and the cache, passed through unchanged. ``lengths`` (``[B]``,
    optional): row ``b``'s first ``lengths[b]`` positions are real, the rest pad a bucket; the CPU kernel
    does not compute those (their output is zero), the XLA formulation does.

    On CPU, where the kernels are built, ``model/kernels/prefill_attention.cc`` runs it, for prompt chunks
    and decode steps (one position per row) alike: a position's attention is then the same arithmetic
    whichever kind of call computes it, so keys and values written while decoding equal the ones a prefill
    of the same tokens writes (``EngineSteps.decode_extends_prefix``). Elsewhere the XLA formulation below
    runs.

    The cache is read in blocks with an online softmax, and only as many blocks as the furthest row needs
    are visited, so a step costs what the live sequences need rather than the whole cache. A block that is
    fully masked for a row leaves that row's running max, sum and output exactly unchanged (factor 1.0,
    zero weights), so a row's result does not depend on how many blocks other rows made the loop visit.
    The group's query heads and positions share one axis so every dot is a batched matmul over
    (row, kv_head).

    The caller writes the new keys/values *before* this loop and the loop carries the cache through: the
    loop's input is then the scatter's output, one chain of uses that XLA updates in place. (Reading the
    donated cache parameter inside the loop and writing it after made XLA copy every layer's cache twice
    per step.)
    """
    batch, seq, _, dim = q.shape
    kv_heads = cache.k.shape[2]
    q = q.reshape(batch, seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, dim)
    q = q * jnp.asarray(dim**-0.5, q.dtype)
    layer, window = jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)
    if kernels.available() and dim % 16 == 0:
        lengths = jnp.full((batch,), seq, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        out = jax.lax.platform_dependent(q, cache, layer, rows, positions, window, lengths,
                                         cpu=lambda *args: _prefill_kernel(*args[:-1], groups, args[-1]),
                                         default=lambda *args: _blockwise(*args[:-1], groups)[0])
        return out, cache
    return _blockwise(q, cache, layer, rows, positions, window, groups)


def _cache_operands(cache: KVCache) -> tuple[jax.Array, ...]:
    no_scales = jnp.zeros((1,), jnp.float32)  # float caches: the kernels ignore the scale operands
    return (cache.k, cache.v, no_scales if cache.k_scale is None else cache.k_scale,
            no_scales if cache.v_scale is None else cache.v_scale)


def _prefill_kernel(q, cache: KVCache, layer, rows, positions, window, groups, lengths=None):
    """Positions per row, a chunk's or a decode step's one (``model/kernels/prefill_attention.cc``): each
    query row computed on its own over cache blocks aligned to absolute positions, so a row's bits do not
    depend on the chunking or the other rows. ``lengths`` ``[B]``: each row's real positions (default all)."""
    if lengths is None:
        lengths = jnp.full((q.shape[0],), positions.shape[1], jnp.int32)
    out = jax.ffi.ffi_call(kernels.PREFILL_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), *_cache_operands(cache), rows.astype(jnp.int32), positions.astype(jnp.int32),
        layer, window, lengths)
    return _heads_last(out.astype(q.dtype), positions.shape[1], groups)


def _heads_last(out: jax.Array, seq: int, groups: int) -> jax.Array:
    """``[B, KV, G * T, D]`` (group-major) back to ``[B, T, H, D]``."""
    batch, kv_heads, _, dim = out.shape
    return out.reshape(batch, kv_heads, groups, seq, dim).transpose(0, 3, 1, 2, 4).reshape(batch, seq, -1, dim)


def _blockwise(q, cache: KVCache, layer, rows, positions, window, groups):
    """The XLA formulation: the cache read block by block with an online softmax (q already ``[B, KV, G*T,
    D]`` and scaled); returns ``[B, T, H, D]`` and the cache."""
    batch, kv_heads, _, dim = q.shape
    seq = q.shape[2] // groups
    length = cache.k.shape[3]
    f32 = jnp.float32
    query_pos = jnp.tile(positions, (1, groups))[:, None, :, None]  # [B, 1, G*T, 1], same (g, t) order as q

    def scores_of(keys):
        if seq == 1:  # decode: products and fixed-order sums, so a row's bits cannot depend on the bucket
            return tree_sum(q[:, :, :, None, :].astype(f32) * keys[:, :, None, :, :].astype(f32), axis=-1)
        return jnp.einsum("bkqd,bksd->bkqs", q, keys, preferred_element_type=f32)

    def weighted_values(weights, values):
        if seq == 1:
            return tree_sum(weights[..., None] * values[:, :, None, :, :].astype(f32), axis=-2)
        return jnp.einsum("bkqs,bksd->bkqd", weights.astype(values.dtype), values, preferred_element_type=f32)

    def block(carry, keys, values, visible):
        top, total, acc = carry
        scores = scores_of(keys)
        scores = jnp.where(visible, scores, _MASK_VALUE)
        new_top = jnp.maximum(top, scores.max(axis=-1, keepdims=True))
        weights = jnp.where(visible, jnp.exp(scores - new_top), 0.0)
        scale = jnp.exp(top - new_top)
        total = total * scale + tree_sum(weights, axis=-1, keepdims=True)
        acc = acc * scale + weighted_values(weights, values)
        return new_top, total, acc

    chunk = _chunk_size(length)
    needed = jnp.max(positions) // chunk + 1  # blocks holding any visible entry

    def cache_block(i, carry):
        state, cache = carry
        start = i * chunk
        keys = read_block(cache.k, cache.k_scale, layer, rows, start, chunk, q.dtype)
        values = read_block(cache.v, cache.v_scale, layer, rows, start, chunk, q.dtype)
        key_pos = start + jnp.arange(chunk)[None, None, None, :]
        visible = (key_pos <= query_pos) & ((window <= 0) | (key_pos > query_pos - window))
        return block(state, keys, values, visible), cache

    n_rows = q.shape[2]
    state = (jnp.full((batch, kv_heads, n_rows, 1), _MASK_VALUE, f32), jnp.zeros((batch, kv_heads, n_rows, 1), f32),
             jnp.zeros((batch, kv_heads, n_rows, dim), f32))
    (_, total, acc), cache = jax.lax.fori_loop(0, jnp.minimum(needed, length // chunk), cache_block, (state, cache))
    return _heads_last((acc / total).astype(q.dtype), seq, groups), cache
