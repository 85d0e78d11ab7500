"""The KV cache: every layer's keys and values in one stacked buffer, rows addressed by index, bfloat16
entries stored as their bits.

Read by ``model/attention.py``, written by ``write_layer``; the cache goes in and out of
``Transformer.apply`` explicitly, so the caller owns (and donates) it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig

# bfloat16 caches are stored as their bits in uint16 buffers: XLA:CPU has no native bfloat16 scatter or
# dynamic slice and widened every layer's whole cache to float32 and back on each step (~3 s per 16 x 2048
# step), and a bitcast of the whole buffer is itself a full copy there. Moving the bits as integers is exact
# and in place; only the new entries (on write) and the blocks attention reads are converted.
_BITS = jnp.dtype(jnp.uint16)


def storage_dtype(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return _BITS
    if dtype.itemsize != 4:
        raise ValueError(f"KV cache dtype must be float32 or bfloat16, not {dtype}")
    return dtype


def to_storage(values: jax.Array, stored: Any) -> jax.Array:
    if stored == _BITS:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), _BITS)
    return values.astype(stored)


def from_storage(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16) if bits.dtype == _BITS else bits


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, stacked: ``k`` is ``[layers, slots, kv_heads, max_len, head_dim]``.

    The model's loop over layers carries the whole stack and addresses a layer by index: the decode
    kernel reads the stack at an offset, a layer's scatter writes into it in place and prefill attention
    slices only the blocks it reads, so no layer's cache is ever copied out. kv_heads sits before max_len
    so attention's dot products see (row, kv_head) as batch dimensions with no transposed copy. The
    storage dtype may be narrower than the compute dtype (bfloat16 halves the memory); entries are widened
    to the compute dtype block by block as attention reads them.

    A row's entry at position ``p`` is valid once the row has processed position ``p``; attention masks by
    position (causal), so stale entries from a slot's previous occupant are never read.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> Any:
        """The entries' type (a bfloat16 cache is stored as uint16 bits, see ``storage_dtype``)."""
        return jnp.dtype(jnp.bfloat16) if self.k.dtype == _BITS else self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any | None = None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = storage_dtype(dtype or cfg.dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write_layer(cache: jax.Array, new: jax.Array, layer: jax.Array, rows: jax.Array, positions: jax.Array
                ) -> jax.Array:
    """Scatter layer ``layer``'s new keys or values ``[B, T, KV, D]`` into the stacked cache's rows ``rows``
    at ``positions``.

    Done in place when the cache is donated. Rows or positions past the cache are dropped (padding rows of
    a decode bucket, bucket padding past the context).
    """
    kv_heads = cache.shape[2]
    index = (layer, rows[:, None, None], jnp.arange(kv_heads)[None, None, :], positions[:, :, None])
    return cache.at[index].set(to_storage(new, cache.dtype), mode="drop")
