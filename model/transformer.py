"""A pure linen decoder for the Llama family (Llama 2/3, Mistral, Qwen 2/3, Gemma).

``Transformer.apply(params, tokens, positions, cache, rows=...) -> (logits, cache)``: the KV cache is an
explicit input and output (no mutable collections), so the caller owns device state and can donate the
buffers.

Layout choices, each for a measured XLA:CPU reason (see ``Transformer``): per-layer params and per-layer
cache buffers with a Python loop over layers; each layer scatters its new keys/values into its own buffer
(``model/kv_cache.py``) and attention reads only the cache blocks a live row needs
(``model/attention.py``). Projections are float (``weights="float32"``, exact parity with transformers) or
8-/4-bit blocks (``weights="int8"``/``"int4"``, ``model/quant.py``; a decode row's bits never depend on the
other rows).
"""

from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import grouped_attention
from model.config import ModelConfig
from model.kv_cache import KVCache, init_cache, write_layer
from model.quant import BLOCK, PANEL, QUANTISED, VOCABULARY_BITS, bits_of, block_matmul, code_bytes, columns, fused_name, padded
from model.reductions import tree_mean

__all__ = ["KVCache", "Transformer", "init_cache", "init_params", "param_shapes"]


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
        normed = x32 * jax.lax.rsqrt(tree_mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
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


class Linear(nn.Module):
    """``x @ kernel (+ bias)``; with ``cfg.weights`` int8/int4 the weights are 8-/4-bit blocks
    (``model/quant.py``; ``bits`` overrides the width, for the LM head).

    The float variant's params and product are exactly ``nn.Dense``'s (so checkpoints and parity are
    unchanged); the quantised variant is ``model.quant.block_matmul``.
    """

    features: int
    use_bias: bool
    cfg: ModelConfig
    bits: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, fan_in = self.cfg, x.shape[-1]
        if cfg.weights in QUANTISED:
            bits = self.bits or bits_of(cfg.weights)
            y = block_matmul(x, *quantized_params(self, fan_in, self.features, bits), self.features).astype(cfg.dtype)
        else:
            kernel = self.param("kernel", nn.initializers.normal(0.02), (fan_in, self.features),
                                jnp.dtype(cfg.param_dtype))
            x, kernel = x.astype(cfg.dtype), kernel.astype(cfg.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.dtype(cfg.param_dtype))
            y = y + bias.astype(cfg.dtype)
        return y


def quantized_params(module: nn.Module, fan_in: int, features: int, bits: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Declare a block-quantised ``[fan_in, features]`` matrix's params on ``module`` (``model/quant.py``'s
    panel layout): codes, scale, offset."""
    panels = padded(features) // PANEL
    return (module.param("codes", nn.initializers.zeros, (panels, fan_in, code_bytes(bits)), jnp.uint8),
            module.param("scale", nn.initializers.ones, (panels, fan_in // BLOCK, PANEL), jnp.float32),
            module.param("offset", nn.initializers.zeros, (panels, fan_in // BLOCK, PANEL), jnp.float32))


def projections(x: jax.Array, cfg: ModelConfig, features: tuple[int, ...], names: tuple[str, ...],
                use_bias: bool) -> list[jax.Array]:
    """Several projections of the same input (q/k/v, gate/up). With quantised weights they are one fused matrix
    (``model.quant.fused_name``): one kernel call instead of several, and the same bits, since each output
    column is computed on its own. Must be called inside a compact module."""
    if cfg.weights in QUANTISED:
        fused = Linear(sum(features), use_bias, cfg, name=fused_name(names))(x)
        return jnp.split(fused, list(itertools.accumulate(features))[:-1], axis=-1)
    return [Linear(n, use_bias, cfg, name=name)(x) for n, name in zip(features, names)]


class Embedding(nn.Module):
    """Token embedding (``[V, H]``) that can also project onto the vocabulary (tied LM head)."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg, shape = self.cfg, (self.cfg.vocab_size, self.cfg.hidden_size)
        if cfg.weights in QUANTISED:
            self.codes, self.scale, self.offset = quantized_params(self, cfg.hidden_size, cfg.vocab_size,
                                                                   VOCABULARY_BITS)
        else:
            self.embedding = self.param("embedding", nn.initializers.normal(0.02), shape,
                                        jnp.dtype(cfg.param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.cfg.weights in QUANTISED:
            return columns(self.codes, self.scale, self.offset, tokens).astype(self.cfg.dtype)
        return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.cfg.weights in QUANTISED:
            return block_matmul(x, self.codes, self.scale, self.offset, self.cfg.vocab_size)
        x, table = x.astype(self.cfg.dtype), self.embedding.astype(self.cfg.dtype)
        return jax.lax.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))


class Attention(nn.Module):
    """Grouped-query attention over this layer's cache; returns the output and the updated cache buffers."""

    cfg: ModelConfig
    window: int | None

    @nn.compact
    def __call__(self, x, cache_k, cache_v, rows, cos, sin, positions):
        cfg = self.cfg
        batch, seq, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        q, k, v = projections(x, cfg, (cfg.num_heads * cfg.head_dim, *(2 * (cfg.num_kv_heads * cfg.head_dim,))),
                              ("q_proj", "k_proj", "v_proj"), cfg.qkv_bias)
        q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        cache_k = write_layer(cache_k, k, rows, positions)
        cache_v = write_layer(cache_v, v, rows, positions)
        out, cache_k, cache_v = grouped_attention(q, cache_k, cache_v, rows, positions, self.window, groups)
        out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
        return Linear(cfg.hidden_size, cfg.o_bias, cfg, name="o_proj")(out), cache_k, cache_v


class MLP(nn.Module):
    """Gated MLP: SwiGLU (silu) or GeGLU (tanh-approximated gelu, Gemma)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate, up = projections(x, cfg, (cfg.intermediate_size,) * 2, ("gate_proj", "up_proj"), False)
        act = jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
        return Linear(cfg.hidden_size, False, cfg, name="down_proj")(act * up)


class Block(nn.Module):
    """One pre-norm decoder layer, with its own params and its own cache buffers."""

    cfg: ModelConfig
    window: int | None

    @nn.compact
    def __call__(self, x, cache_k, cache_v, rows, cos, sin, positions):
        cfg = self.cfg
        norm = dict(
            eps=cfg.rms_norm_eps,
            weight_offset=cfg.norm_weight_offset,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
        )
        h, cache_k, cache_v = Attention(cfg, self.window, name="attn")(
            RMSNorm(name="input_norm", **norm)(x), cache_k, cache_v, rows, cos, sin, positions
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(name="post_attention_norm", **norm)(x))
        return x, cache_k, cache_v


class Transformer(nn.Module):
    """Decoder-only LM. ``tokens``/``positions`` are ``[batch, seq]`` int32; returns float32 logits.

    ``rows`` (``[batch]``, optional; default ``0..batch-1``) names the cache row each batch row reads and
    writes, so a decode step can run a bucket of live slots out of a larger cache, and a prefill can fill
    one slot, without copying cache rows. ``logit_indices`` (``[batch, k]``, optional) selects which
    sequence positions get logits, so a bucketed prefill computes the vocabulary projection for its last
    real token only.

    The layers are a Python loop over per-layer params and per-layer cache buffers (not ``nn.scan`` over
    stacked ones): XLA:CPU copied each layer's slice of stacked weights before its matmuls (~24 ms per
    16-row step), and per-layer buffers have no slices to copy.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        logit_indices: jax.Array | None = None,
        rows: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if rows is None:
            rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        embed = Embedding(cfg, name="embed")
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=dtype)
        cos, sin = rope_tables(cfg, positions)
        windows = cfg.sliding_windows or (None,) * cfg.num_layers
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            x, k, v = Block(cfg, windows[i], name=f"layers_{i}")(x, cache.k[i], cache.v[i], rows, cos, sin, positions)
            new_k.append(k)
            new_v.append(v)
        x = RMSNorm(
            cfg.rms_norm_eps, cfg.norm_weight_offset, dtype, jnp.dtype(cfg.param_dtype), name="final_norm"
        )(x)
        project = embed.attend if cfg.tie_word_embeddings else Linear(cfg.vocab_size, False, cfg, VOCABULARY_BITS, name="lm_head")
        if logit_indices is None:
            logits = project(x)
        else:
            # Selected positions (a prefill's last tokens) are projected one batch row at a time: a float32
            # product's rows change with its row count on XLA:CPU, and a prompt's first-token logits must
            # not depend on how many prompts were prefilled beside it.
            x = jnp.take_along_axis(x, logit_indices[:, :, None], axis=1)
            logits = jnp.concatenate([project(x[b:b + 1]) for b in range(x.shape[0])])
        return logits.astype(jnp.float32), KVCache(tuple(new_k), tuple(new_v))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Randomly initialised parameters (tests and shape templates)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = init_cache(cfg, 1, 1)
    return Transformer(cfg).init(rng, tokens, tokens, cache)["params"]


def param_shapes(cfg: ModelConfig) -> Any:
    """The params pytree as ShapeDtypeStructs, without allocating (for loaders and orbax restore)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
