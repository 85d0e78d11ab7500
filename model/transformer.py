"""A pure linen decoder for the Llama family (Llama 2/3, Mistral, Qwen 2/3, Gemma).

``Transformer.apply(params, tokens, positions, cache) -> (logits, cache)``: the KV cache is an explicit
input and output (no mutable collections), so the caller owns device state and can donate the buffers.

The layer stack is an ``nn.scan`` (params stacked on a leading layer axis): XLA compiles one layer instead
of ``num_layers``. Each layer reads the blocks of the cache it needs from the whole cache (a loop-invariant
input, read only) and returns only this call's new keys/values; they are scattered into the cache once after
the loop. Nothing cache-sized is carried, sliced per layer or returned through the loop, so XLA copies no
cache (carrying it and writing per layer, or scanning over it, copied it every step).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig

_MASK_VALUE = -1e30  # finite so a fully masked row cannot produce NaNs


@flax.struct.dataclass
class KVCache:
    """Keys and values for every layer, slot and position: ``[layers, batch, kv_heads, max_len, head_dim]``.

    kv_heads sits before max_len so attention's dot products see (batch, kv_heads) as leading batch
    dimensions and need no transposed copy of the cache.

    A row's entry at position ``p`` is valid once the row has processed position ``p``; attention masks by
    position (causal), so stale entries from a slot's previous occupant are never read.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any | None = None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the reference implementations do, then cast back."""

    eps: float
    weight_offset: float = 0.0  # Gemma stores (scale - 1)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.weight_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.weight_offset:
            return (normed * (self.weight_offset + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[batch, seq, head_dim]`` for the given absolute positions (float32)."""
    inv_freq = jnp.asarray(cfg.inverse_frequencies())
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, T, heads, D]`` in the half-split layout (HF's ``rotate_half``)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _dense(features: int, use_bias: bool, name: str, cfg: ModelConfig) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


CACHE_CHUNK = 128  # cache positions per attention block


def _chunk_size(length: int) -> int:
    """The largest power of two <= CACHE_CHUNK that divides the cache length (blocks must tile it)."""
    size = CACHE_CHUNK
    while length % size:
        size //= 2
    return size


def grouped_attention(q, k_new, v_new, cache_k, cache_v, layer, positions, window, groups):
    """Causal (optionally sliding-window) GQA over the cached prefix plus this call's own keys/values.

    ``q`` ``[B, T, H, D]``; ``k_new``/``v_new`` ``[B, T, KV, D]``; ``cache_k``/``cache_v`` the whole
    ``[L, B, KV, S, D]`` cache, of which only layer ``layer``'s needed blocks are read (read only: the new
    entries are written once after the layer loop, so XLA never copies the cache).
    A cache entry is visible when it lies before this call's first position; this call's tokens see each
    other causally.

    The cache is read in blocks with an online softmax, and only as many blocks as the furthest row needs
    are visited, so a step costs what the live sequences need rather than the whole cache. A block that is
    fully masked for a row leaves that row's running max, sum and output exactly unchanged (factor 1.0,
    zero weights), so a row's result does not depend on how many blocks other rows made the loop visit.
    The group's query heads and positions share one axis so every dot is a batched matmul over
    (batch, kv_head).
    """
    batch, seq, heads, dim = q.shape
    kv_heads, length = cache_k.shape[2], cache_k.shape[3]
    f32 = jnp.float32
    q = q.reshape(batch, seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, dim)
    q = q * jnp.asarray(dim**-0.5, q.dtype)
    query_pos = jnp.tile(positions, (1, groups))[:, None, :, None]  # [B, 1, G*T, 1], same (g, t) order as q
    first = positions[:, :1][:, None, :, None]  # [B, 1, 1, 1]: cache entries before this are valid

    def block(carry, keys, values, visible):
        top, total, acc = carry
        scores = jnp.einsum("bkqd,bksd->bkqs", q, keys, preferred_element_type=f32)
        scores = jnp.where(visible, scores, _MASK_VALUE)
        new_top = jnp.maximum(top, scores.max(axis=-1, keepdims=True))
        weights = jnp.where(visible, jnp.exp(scores - new_top), 0.0)
        scale = jnp.exp(top - new_top)
        total = total * scale + weights.sum(axis=-1, keepdims=True)
        acc = acc * scale + jnp.einsum("bkqs,bksd->bkqd", weights.astype(values.dtype), values,
                                       preferred_element_type=f32)
        return new_top, total, acc

    chunk = _chunk_size(length)
    needed = (jnp.max(positions[:, 0]) + chunk - 1) // chunk  # blocks holding any visible cache entry

    def cache_block(i, carry):
        start = i * chunk
        corner, size = (layer, 0, 0, start, 0), (1, batch, kv_heads, chunk, dim)
        keys = jax.lax.dynamic_slice(cache_k, corner, size)[0].astype(q.dtype)
        values = jax.lax.dynamic_slice(cache_v, corner, size)[0].astype(q.dtype)
        key_pos = start + jnp.arange(chunk)[None, None, None, :]
        visible = (key_pos < first) & (key_pos > query_pos - window)
        return block(carry, keys, values, visible)

    rows = q.shape[2]
    carry = (jnp.full((batch, kv_heads, rows, 1), _MASK_VALUE, f32), jnp.zeros((batch, kv_heads, rows, 1), f32),
             jnp.zeros((batch, kv_heads, rows, dim), f32))
    carry = jax.lax.fori_loop(0, jnp.minimum(needed, length // chunk), cache_block, carry)
    fresh_pos = positions[:, None, None, :]  # [B, 1, 1, T]
    visible = (fresh_pos <= query_pos) & (fresh_pos > query_pos - window)
    _, total, acc = block(carry, k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3), visible)
    out = (acc / total).astype(q.dtype)
    return out.reshape(batch, kv_heads, groups, seq, dim).transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, dim)


def write_cache(cache: "KVCache", k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "KVCache":
    """Scatter every layer's new keys/values ``[L, B, T, KV, D]`` into the cache at ``positions`` ``[B, T]``.

    One scatter for the whole call, outside the layer loop, done in place when the cache is donated.
    Positions past the cache are dropped.
    """
    layers, batch, seq, kv_heads, _ = k_new.shape
    index = (
        jnp.arange(layers)[:, None, None, None],
        jnp.arange(batch)[None, :, None, None],
        jnp.arange(kv_heads)[None, None, None, :],
        positions[None, :, :, None],
    )
    return KVCache(
        cache.k.at[index].set(k_new.astype(cache.k.dtype), mode="drop"),
        cache.v.at[index].set(v_new.astype(cache.v.dtype), mode="drop"),
    )


class Attention(nn.Module):
    """Grouped-query attention over this layer's (read-only) cache; returns the new keys/values too."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cache_k, cache_v, layer, window, cos, sin, positions):
        cfg = self.cfg
        batch, seq, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        q = _dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, "q_proj", cfg)(x)
        k = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "k_proj", cfg)(x)
        v = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "v_proj", cfg)(x)
        q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        out = grouped_attention(q, k, v, cache_k, cache_v, layer, positions, window, groups)
        out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
        return _dense(cfg.hidden_size, cfg.o_bias, "o_proj", cfg)(out), k, v


class MLP(nn.Module):
    """Gated MLP: SwiGLU (silu) or GeGLU (tanh-approximated gelu, Gemma)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, False, "gate_proj", cfg)(x)
        up = _dense(cfg.intermediate_size, False, "up_proj", cfg)(x)
        act = jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
        return _dense(cfg.hidden_size, False, "down_proj", cfg)(act * up)


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over the layer axis."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, window, cache_k, cache_v, cos, sin, positions):
        x, layer = carry
        cfg = self.cfg
        norm = dict(
            eps=cfg.rms_norm_eps,
            weight_offset=cfg.norm_weight_offset,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
        )
        h, k_new, v_new = Attention(cfg, name="attn")(
            RMSNorm(name="input_norm", **norm)(x), cache_k, cache_v, layer, window, cos, sin, positions
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(name="post_attention_norm", **norm)(x))
        return (x, layer + 1), (k_new, v_new)


class Transformer(nn.Module):
    """Decoder-only LM. ``tokens``/``positions`` are ``[batch, seq]`` int32; returns float32 logits.

    ``logit_indices`` (``[batch, k]``, optional) selects which sequence positions get logits, so a
    bucketed prefill computes the vocabulary projection for its last real token only.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        logit_indices: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.initializers.normal(0.02),
            name="embed",
        )
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=dtype)
        cos, sin = rope_tables(cfg, positions)
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, name="layers")
        windows = jnp.asarray(cfg.window_sizes())
        (x, _), (k_new, v_new) = layers((x, jnp.int32(0)), windows, cache.k, cache.v, cos, sin, positions)
        x = RMSNorm(
            cfg.rms_norm_eps, cfg.norm_weight_offset, dtype, jnp.dtype(cfg.param_dtype), name="final_norm"
        )(x)
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[:, :, None], axis=1)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg.vocab_size, False, "lm_head", cfg)(x)
        return logits.astype(jnp.float32), write_cache(cache, k_new, v_new, positions)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Randomly initialised parameters (tests and shape templates)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = init_cache(cfg, 1, 1)
    return Transformer(cfg).init(rng, tokens, tokens, cache)["params"]


def param_shapes(cfg: ModelConfig) -> Any:
    """The params pytree as ShapeDtypeStructs, without allocating (for loaders and orbax restore)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
