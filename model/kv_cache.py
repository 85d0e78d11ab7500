"""The KV cache: every layer's keys and values in one stacked buffer, rows addressed by index; entries
stored as float32, bfloat16 (as their bits) or int8 codes with float32 scales (one per 32 elements).

Read by ``model/attention.py``, written by ``write_layer``; the cache goes in and out of
``Transformer.apply`` explicitly, so the caller owns (and donates) it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flaxchat.model.config import ModelConfig

KV_DTYPES = ("float32", "bfloat16", "int8")

# bfloat16 caches are stored as their bits in uint16 buffers: XLA:CPU has no native bfloat16 scatter or
# dynamic slice and widened every layer's whole cache to float32 and back on each step (~3 s per 16 x 2048
# step), and a bitcast of the whole buffer is itself a full copy there. Moving the bits as integers is exact
# and in place; only the new entries (on write) and the blocks attention reads are converted.
_BITS = jnp.dtype(jnp.uint16)
_CODES = jnp.dtype(jnp.int8)
_LEVELS = 127  # int8 codes are -127..127, symmetric around 0
# Elements per int8 scale. Measured on the default model with int4 weights (bench/quant_quality.py): one
# scale per 64-element head vector kept 4 of 6 greedy continuations equal to float32's (the bar is 5), one
# per 32 kept 6 of 6 (log-likelihood 0.22 %); 8 bytes of scales per 64 codes.
SCALE_GROUP = 32


def storage_dtype(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return _BITS
    if dtype == _CODES:
        return _CODES
    if dtype.itemsize != 4:
        raise ValueError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, not {dtype}")
    return dtype


def to_storage(values: jax.Array, stored: Any) -> jax.Array:
    """Float entries as a float cache stores them (int8 caches go through ``quantize_entries``)."""
    if stored == _BITS:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), _BITS)
    return values.astype(stored)


def from_storage(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16) if bits.dtype == _BITS else bits


def scale_groups(head_dim: int) -> int:
    """Scales per int8 key/value vector: one per ``SCALE_GROUP`` elements (one per vector if it does not divide)."""
    return head_dim // SCALE_GROUP if head_dim % SCALE_GROUP == 0 else 1


def quantize_entries(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Entries ``[..., head_dim]`` -> int8 codes and float32 scales ``[..., scale_groups(head_dim)]``
    (absmax / 127 of each group): ``value ~= code * scale``. Each entry is quantised on its own, so its codes
    do not depend on the other rows, positions or chunk sizes (the seed contract and the prefix cache rely
    on that)."""
    values = values.astype(jnp.float32)
    dim = values.shape[-1]
    groups = values.reshape(*values.shape[:-1], scale_groups(dim), -1)
    scale = jnp.max(jnp.abs(groups), axis=-1) / jnp.float32(_LEVELS)
    codes = jnp.round(groups / jnp.where(scale == 0, jnp.float32(1), scale)[..., None])
    return jnp.clip(codes, -_LEVELS, _LEVELS).astype(_CODES).reshape(values.shape), scale


def dequantize_entries(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """``code * scale`` in float32 (one rounding, as the decode kernel computes it)."""
    groups = codes.reshape(*codes.shape[:-1], scale.shape[-1], -1).astype(jnp.float32)
    return (groups * scale[..., None]).reshape(codes.shape)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, stacked: ``k`` is ``[layers, slots, kv_heads, max_len, head_dim]``;
    an int8 cache also holds ``k_scale``/``v_scale`` ``[layers, slots, kv_heads, max_len, groups]`` (float32,
    one per ``SCALE_GROUP`` elements).

    The model's loop over layers carries the whole stack and addresses a layer by index: the decode
    kernel reads the stack at an offset, a layer's scatter writes into it in place and prefill attention
    slices only the blocks it reads, so no layer's cache is ever copied out. kv_heads sits before max_len
    so attention's dot products see (row, kv_head) as batch dimensions with no transposed copy. The
    storage may be narrower than the compute dtype (bfloat16 halves the memory, int8 codes with a scale
    per 32 take 56 %); entries are widened to the compute dtype block by block as attention reads them.

    A row's entry at position ``p`` is valid once the row has processed position ``p``; attention masks by
    position (causal), so stale entries from a slot's previous occupant are never read.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> Any:
        """The entries' type (a bfloat16 cache is stored as uint16 bits, see ``storage_dtype``)."""
        return jnp.dtype(jnp.bfloat16) if self.k.dtype == _BITS else self.k.dtype

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self))


def entry_bytes(dtype: Any, head_dim: int) -> int:
    """Bytes of one stored key or value vector (with its scales for int8)."""
    dtype = jnp.dtype(dtype)
    return head_dim * dtype.itemsize + (4 * scale_groups(head_dim) if dtype == _CODES else 0)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any | None = None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = storage_dtype(dtype or cfg.dtype)
    if dtype == _CODES:
        scales = (*shape[:-1], scale_groups(cfg.head_dim))
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       k_scale=jnp.zeros(scales, jnp.float32), v_scale=jnp.zeros(scales, jnp.float32))
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write_layer(cache: KVCache, k: jax.Array, v: jax.Array, layer: jax.Array, rows: jax.Array,
                positions: jax.Array) -> KVCache:
    """Scatter layer ``layer``'s new keys and values ``[B, T, KV, D]`` into the cache rows ``rows`` at
    ``positions``.

    Done in place when the cache is donated. Rows or positions past the cache are dropped (padding rows of
    a decode bucket, bucket padding past the context).
    """
    kv_heads = cache.k.shape[2]
    index = (layer, rows[:, None, None], jnp.arange(kv_heads)[None, None, :], positions[:, :, None])

    def put(buffer: jax.Array, new: jax.Array) -> jax.Array:
        return buffer.at[index].set(new, mode="drop")

    if cache.k_scale is None:
        return KVCache(put(cache.k, to_storage(k, cache.k.dtype)), put(cache.v, to_storage(v, cache.v.dtype)))
    (k_codes, k_scale), (v_codes, v_scale) = quantize_entries(k), quantize_entries(v)
    return KVCache(put(cache.k, k_codes), put(cache.v, v_codes), put(cache.k_scale, k_scale),
                   put(cache.v_scale, v_scale))
