"""A pure linen decoder for the Llama family (Llama 2/3, Mistral, Qwen 2/3, Gemma).

``Transformer.apply(params, tokens, positions, cache) -> (logits, cache)``: the KV cache is an explicit
input and output (no mutable collections), so the caller owns device state and can donate the buffers.

The layer stack is an ``nn.scan`` (params stacked on a leading layer axis): XLA compiles one layer instead
of ``num_layers``. Each layer reads its cache slice as a scan input (read only) and returns only this call's
new keys/values; they are scattered into the cache once after the loop. Nothing cache-sized is carried or
returned through the loop, so XLA copies no cache (carrying it and writing per layer copied it).
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


def grouped_attention(q, k_new, v_new, cache_k, cache_v, positions, window, groups):
    """Causal (optionally sliding-window) GQA over the cached prefix plus this call's own keys/values.

    ``q`` ``[B, T, H, D]``; ``k_new``/``v_new`` ``[B, T, KV, D]``; ``cache_k``/``cache_v`` ``[B, KV, S, D]``
    (read only). A cache entry is visible when it lies before this call's first position (later entries
    are stale or not written yet); this call's tokens see each other causally. Keeping the cache read-only
    inside the layer loop means XLA never copies it; the new entries are written once, after the loop.
    The group's query heads and the query positions share one axis so every dot is a plain batched matmul
    over (batch, kv_head).
    """
    batch, seq, heads, dim = q.shape
    kv_heads, length = cache_k.shape[1], cache_k.shape[2]
    scale = dim**-0.5
    q = q.reshape(batch, seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, dim)
    k_new = k_new.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    v_new = v_new.transpose(0, 2, 1, 3)
    f32 = jnp.float32
    cached = jnp.einsum("bkqd,bksd->bkqs", q, cache_k, preferred_element_type=f32).reshape(
        batch, kv_heads, groups, seq, length)
    fresh = jnp.einsum("bkqd,bktd->bkqt", q, k_new, preferred_element_type=f32).reshape(
        batch, kv_heads, groups, seq, seq)
    query_pos = positions[:, :, None]
    cache_pos = jnp.arange(length)[None, None, :]
    cache_visible = (cache_pos < positions[:, :1, None]) & (cache_pos > query_pos - window)  # [B, T, S]
    fresh_pos = positions[:, None, :]
    fresh_visible = (fresh_pos <= query_pos) & (fresh_pos > query_pos - window)  # [B, T, T]
    scores = jnp.concatenate(
        [jnp.where(cache_visible[:, None, None], cached, _MASK_VALUE),
         jnp.where(fresh_visible[:, None, None], fresh, _MASK_VALUE)], axis=-1) * scale
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(batch, kv_heads, groups * seq, length + seq)
    out = jnp.einsum("bkqs,bksd->bkqd", probs[..., :length], cache_v) + jnp.einsum(
        "bkqt,bktd->bkqd", probs[..., length:], v_new)
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
    def __call__(self, x, cache_k, cache_v, window, cos, sin, positions):
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

        out = grouped_attention(q, k, v, cache_k.astype(q.dtype), cache_v.astype(q.dtype), positions, window, groups)
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
    def __call__(self, x, window, cache_k, cache_v, cos, sin, positions):
        cfg = self.cfg
        norm = dict(
            eps=cfg.rms_norm_eps,
            weight_offset=cfg.norm_weight_offset,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
        )
        h, k_new, v_new = Attention(cfg, name="attn")(
            RMSNorm(name="input_norm", **norm)(x), cache_k, cache_v, window, cos, sin, positions
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(name="post_attention_norm", **norm)(x))
        return x, (k_new, v_new)


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
            in_axes=(0, 0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, name="layers")
        windows = jnp.asarray(cfg.window_sizes())
        x, (k_new, v_new) = layers(x, windows, cache.k, cache.v, cos, sin, positions)
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
