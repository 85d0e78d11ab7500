"""A pure linen decoder for the Llama family (Llama 2/3, Mistral, Qwen 2/3, Gemma) and its mixtures of experts
(Qwen3-MoE, Mixtral).

``Transformer.apply(params, tokens, positions, cache, rows=...) -> (logits, cache)``: the KV cache is an
explicit input and output (no mutable collections), so the caller owns device state and can donate the
buffers.

Layout choices, each for a measured reason (see ``Transformer``): the decoder layers' params are stacked
(``params["layers"]``, every leaf ``[num_layers, ...]``) and so is the cache; one ``fori_loop`` runs the
layers, and each layer addresses its weights and cache by index. Projections are float
(``weights="float32"``, exact parity with transformers) or 8-/4-bit blocks (``weights="int8"``/``"int4"``,
``model/quant.py``; a decode row's bits never depend on the other rows).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxchat.model.attention import grouped_attention
from flaxchat.model.config import ModelConfig
from flaxchat.model.experts import activation, dense_experts
from flaxchat.model.kv_cache import KVCache, init_cache, write_layer
from flaxchat.model.quant import (BLOCK, PANEL, QUANTISED, VOCABULARY_BITS, bits_of, block_matmul, code_bytes, columns,
                                  fused_name, padded, rows_independent)
from flaxchat.model.reductions import tree_mean

__all__ = ["KVCache", "Transformer", "init_cache", "init_params", "layer_spec", "param_shapes"]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, weight_offset: float, dtype: Any) -> jax.Array:
    """RMSNorm computed in float32, as the reference implementations do, then cast back to ``dtype``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(tree_mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight_offset:  # Gemma stores (scale - 1)
        return (normed * (weight_offset + scale.astype(jnp.float32))).astype(dtype)
    return scale.astype(dtype) * normed.astype(dtype)


class RMSNorm(nn.Module):
    """``rms_norm`` with its scale as a param (the final norm)."""

    eps: float
    weight_offset: float = 0.0  # Gemma stores (scale - 1)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.weight_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps, self.weight_offset, self.dtype)


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


def linear(x: jax.Array, w: dict, features: int, cfg: ModelConfig, layer: jax.Array | None = None,
           normed_input: bool = False, out_dtype: Any = None, valid: jax.Array | None = None) -> jax.Array:
    """``x @ W (+ bias)`` for one projection's params ``w``: a float ``kernel`` ``[in, out]`` or quantised
    ``codes``/``scale``/``offset`` (``model/quant.py``). With ``layer``, every leaf of ``w`` is a stack over
    the decoder layers and layer ``layer``'s matrix is used: the quantised kernel takes the whole stack and
    the index (nothing is copied); a float kernel is indexed (XLA:CPU copies that slice, the price of the
    float32 parity mode). A prompt chunk (``x`` ``[B, T > 1, K]``) of a ``normed_input`` (an RMSNorm's output:
    q/k/v and gate/up) follows ``cfg.prompt_activations``; the attention output and the MLP's hidden state,
    with their outliers, stay float (measured: quantising them too cost the quality bar, bench/RESULTS.md).
    ``out_dtype``: the float product's accumulation and result type (float32 for the logits whatever the
    compute dtype: a bfloat16 sum over the hidden size would round the vocabulary's scores). ``valid``
    (``x``'s leading shape): the rows whose results are used; the quantised kernel skips trailing padding."""
    pick = (lambda a: a) if layer is None else (lambda a: a[layer])  # noqa: E731
    if "codes" in w:
        prompt_chunk = x.ndim == 3 and x.shape[1] > 1  # decode steps have one position per row
        int8 = normed_input and prompt_chunk and cfg.prompt_activations == "int8"
        y = block_matmul(x, w["codes"], w["scale"], w["offset"], features, layer, int8_activations=int8,
                         valid=valid).astype(cfg.dtype)
    else:
        x, kernel = x.astype(cfg.dtype), pick(w["kernel"]).astype(cfg.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    if "bias" in w:
        y = y + pick(w["bias"]).astype(y.dtype)
    return y


class Linear(nn.Module):
    """``linear`` with its params declared (the untied LM head); ``bits`` sets the quantised code width.

    The float variant's params and product are exactly ``nn.Dense``'s (so checkpoints and parity are
    unchanged); the quantised variant is ``model.quant.block_matmul``.
    """

    features: int
    use_bias: bool
    cfg: ModelConfig
    bits: int | None = None
    out_dtype: Any = None  # see ``linear``

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, fan_in = self.cfg, x.shape[-1]
        if cfg.weights in QUANTISED:
            codes, scale, offset = quantized_params(self, fan_in, self.features, self.bits or bits_of(cfg.weights))
            w = {"codes": codes, "scale": scale, "offset": offset}
        else:
            w = {"kernel": self.param("kernel", nn.initializers.normal(0.02), (fan_in, self.features),
                                      jnp.dtype(cfg.param_dtype))}
        if self.use_bias:
            w["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), jnp.dtype(cfg.param_dtype))
        return linear(x, w, self.features, cfg, out_dtype=self.out_dtype)


def quantized_params(module: nn.Module, fan_in: int, features: int, bits: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Declare a block-quantised ``[fan_in, features]`` matrix's params on ``module`` (``model/quant.py``'s
    panel layout): codes, scale, offset."""
    spec = quantized_spec(fan_in, features, bits)
    return tuple(module.param(name, init, shape, dtype) for name, (shape, dtype, init) in spec.items())


def quantized_spec(fan_in: int, features: int, bits: int) -> dict:
    """Shapes, dtypes and initialisers of a block-quantised ``[fan_in, features]`` matrix."""
    panels = padded(features) // PANEL
    return {"codes": ((panels, fan_in, code_bytes(bits)), jnp.uint8, nn.initializers.zeros),
            "scale": ((panels, fan_in // BLOCK, PANEL), jnp.float32, nn.initializers.ones),
            "offset": ((panels, fan_in // BLOCK, PANEL), jnp.float32, nn.initializers.zeros)}


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
        return jax.lax.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def layer_spec(cfg: ModelConfig) -> dict:
    """One decoder layer's params as ``{name: ... (shape, dtype, initialiser)}``: the same names and shapes
    linen submodules would give (``attn/q_proj/kernel``, ...), with quantised weights' fused projections
    (``model.quant.fused_name``: q/k/v and gate/up as one matrix each, one kernel call instead of several,
    the same bits since each output column is computed on its own)."""
    param_dtype = jnp.dtype(cfg.param_dtype)
    hidden, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bits = bits_of(cfg.weights) if cfg.weights in QUANTISED else None

    def matrix(fan_in: int, features: int, bias: bool) -> dict:
        if bits:
            spec = quantized_spec(fan_in, features, bits)
        else:
            spec = {"kernel": ((fan_in, features), param_dtype, nn.initializers.normal(0.02))}
        if bias:
            spec["bias"] = ((features,), param_dtype, nn.initializers.zeros)
        return spec

    def group(names: tuple[str, ...], fan_in: int, features: tuple[int, ...], bias: bool) -> dict:
        if bits:
            return {fused_name(names): matrix(fan_in, sum(features), bias)}
        return {name: matrix(fan_in, n, bias) for name, n in zip(names, features)}

    def norm(size: int, offset: float = 0.0) -> dict:
        return {"scale": ((size,), param_dtype, nn.initializers.zeros if offset else nn.initializers.ones)}

    attn = {**group(("q_proj", "k_proj", "v_proj"), hidden, (q_dim, kv_dim, kv_dim), cfg.qkv_bias),
            "o_proj": matrix(q_dim, hidden, cfg.o_bias)}
    if cfg.qk_norm:
        attn.update(q_norm=norm(cfg.head_dim), k_norm=norm(cfg.head_dim))
    if cfg.num_experts:
        mlp = expert_spec(cfg, param_dtype)
        if cfg.shared_expert_intermediate_size:  # Qwen2-MoE: a dense MLP every token runs, under a sigmoid gate
            width = cfg.shared_expert_intermediate_size
            mlp["shared"] = {"gate_proj": matrix(hidden, width, False), "up_proj": matrix(hidden, width, False),
                             "down_proj": matrix(width, hidden, False)}
            mlp["shared_gate"] = {"kernel": ((hidden, 1), param_dtype, nn.initializers.normal(0.02))}
    else:
        mlp = {**group(("gate_proj", "up_proj"), hidden, (cfg.intermediate_size,) * 2, False),
               "down_proj": matrix(cfg.intermediate_size, hidden, False)}
    return {"input_norm": norm(hidden, cfg.norm_weight_offset),
            "post_attention_norm": norm(hidden, cfg.norm_weight_offset), "attn": attn, "mlp": mlp}


def expert_spec(cfg: ModelConfig, param_dtype: Any) -> dict:
    """A mixture-of-experts MLP's params: the router ``[hidden, experts]`` and every expert's projections
    stacked on an experts axis (``[experts, in, out]``)."""
    hidden, width, experts = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    init = nn.initializers.normal(0.02)
    return {"router": {"kernel": ((hidden, experts), param_dtype, init)},
            "experts": {"gate_proj": ((experts, hidden, width), param_dtype, init),
                        "up_proj": ((experts, hidden, width), param_dtype, init),
                        "down_proj": ((experts, width, hidden), param_dtype, init)}}


def init_layers(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Every decoder layer's params, stacked: each leaf ``[num_layers, *shape]``."""
    is_spec = lambda node: isinstance(node, tuple)  # noqa: E731
    specs, treedef = jax.tree.flatten(layer_spec(cfg), is_leaf=is_spec)
    keys = jax.random.split(rng, len(specs))
    leaves = [init(key, (cfg.num_layers, *shape), dtype) for key, (shape, dtype, init) in zip(keys, specs)]
    return jax.tree.unflatten(treedef, leaves)


def _projections(x: jax.Array, w: dict, cfg: ModelConfig, layer: jax.Array, names: tuple[str, ...],
                 features: tuple[int, ...], valid: jax.Array | None) -> list[jax.Array]:
    """Several projections of the same normed input (one fused matrix with quantised weights, see
    ``layer_spec``)."""
    if fused_name(names) in w:
        fused = linear(x, w[fused_name(names)], sum(features), cfg, layer, normed_input=True, valid=valid)
        return jnp.split(fused, list(itertools.accumulate(features))[:-1], axis=-1)
    return [linear(x, w[name], n, cfg, layer, normed_input=True, valid=valid) for name, n in zip(names, features)]


def _attention(x, w, cfg: ModelConfig, layer, window, cache: KVCache, rows, cos, sin, positions, valid):
    """Grouped-query attention of one layer over its cache; returns the output and the updated cache."""
    batch, seq, _ = x.shape
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = _projections(x, w, cfg, layer, ("q_proj", "k_proj", "v_proj"), (q_dim, kv_dim, kv_dim), valid)
    q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"]["scale"][layer], cfg.rms_norm_eps, 0.0, cfg.dtype)
        k = rms_norm(k, w["k_norm"]["scale"][layer], cfg.rms_norm_eps, 0.0, cfg.dtype)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    cache = write_layer(cache, k, v, layer, rows, positions)
    lengths = None if valid is None else jnp.sum(valid, axis=1, dtype=jnp.int32)
    out, cache = grouped_attention(q, cache, layer, rows, positions, window, cfg.num_heads // cfg.num_kv_heads,
                                   lengths)
    return linear(out.reshape(batch, seq, q_dim), w["o_proj"], cfg.hidden_size, cfg, layer, valid=valid), cache


def _mlp(x, w, cfg: ModelConfig, layer, valid):
    """Gated MLP: SwiGLU (silu) or GeGLU (tanh-approximated gelu, Gemma); a mixture of experts if the config
    has them."""
    if cfg.num_experts:
        return dense_experts(x, w, cfg, layer, lambda h, shared, width: _gated_mlp(h, shared, cfg, layer, width))
    return _gated_mlp(x, w, cfg, layer, cfg.intermediate_size, valid)


def _gated_mlp(x, w, cfg: ModelConfig, layer, width: int, valid=None):
    """``down(act(gate(x)) * up(x))`` with ``width`` units: the dense MLP, and Qwen2-MoE's shared expert."""
    gate, up = _projections(x, w, cfg, layer, ("gate_proj", "up_proj"), (width,) * 2, valid)
    return linear(activation(gate, cfg) * up, w["down_proj"], cfg.hidden_size, cfg, layer, valid=valid)


def decoder_layer(cfg: ModelConfig, layers: dict, layer: jax.Array, window: jax.Array, x: jax.Array,
                  cache: KVCache, rows, cos, sin, positions, valid=None) -> tuple[jax.Array, KVCache]:
    """Pre-norm decoder layer ``layer`` (an int32 index into the stacked ``layers`` params and cache)."""
    def norm(h, name):
        return rms_norm(h, layers[name]["scale"][layer], cfg.rms_norm_eps, cfg.norm_weight_offset, cfg.dtype)

    h, cache = _attention(norm(x, "input_norm"), layers["attn"], cfg, layer, window, cache, rows, cos, sin,
                          positions, valid)
    x = x + h
    x = x + _mlp(norm(x, "post_attention_norm"), layers["mlp"], cfg, layer, valid)
    return x, cache


class Transformer(nn.Module):
    """Decoder-only LM. ``tokens``/``positions`` are ``[batch, seq]`` int32; returns float32 logits.

    ``rows`` (``[batch]``, optional; default ``0..batch-1``) names the cache row each batch row reads and
    writes, so a decode step can run a bucket of live slots out of a larger cache, and a prefill can fill
    one slot, without copying cache rows. ``logit_indices`` (``[batch, k]``, optional) selects which
    sequence positions get logits, so a bucketed prefill computes the vocabulary projection for its last
    real token only. ``valid`` (``[batch, seq]`` bool, optional; each row's real positions first) flags the
    positions whose results are used: the CPU kernels skip the padding of a bucket (its products and
    attention come out zero; nothing real reads them), so a padded call costs the rows it carries.

    The layers are one ``fori_loop`` over stacked params and a stacked cache, each layer addressing its
    weights and cache by index: a program traces and compiles one layer instead of ``num_layers`` (warm-up
    was dominated by tracing thirty copies), and a call takes ~20 param buffers instead of ~400 (jax's
    per-call argument handling). Nothing big is sliced inside the loop, since XLA:CPU copies a slice before
    using it (~24 ms per 16-row step with ``nn.scan``'s sliced weights): the quantised kernel and the decode
    attention kernel take the whole stack and the layer index, the cache scatter writes in place, and
    prefill attention slices only the blocks it reads.
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
        valid: jax.Array | None = None,
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
        layers = self.param("layers", functools.partial(init_layers, cfg))
        windows = jnp.asarray([w or 0 for w in cfg.sliding_windows] or [0] * cfg.num_layers, jnp.int32)

        def one_layer(layer, carry):
            return decoder_layer(cfg, layers, layer, windows[layer], *carry, rows, cos, sin, positions, valid)

        x, cache = jax.lax.fori_loop(0, cfg.num_layers, one_layer, (x, cache))
        x = RMSNorm(
            cfg.rms_norm_eps, cfg.norm_weight_offset, dtype, jnp.dtype(cfg.param_dtype), name="final_norm"
        )(x)
        project = embed.attend if cfg.tie_word_embeddings else Linear(cfg.vocab_size, False, cfg, VOCABULARY_BITS,
                                                                      out_dtype=jnp.float32, name="lm_head")
        if logit_indices is None:
            logits = project(x)
        else:
            # Selected positions (a prefill's last tokens, a scored prompt's every token) are projected one at
            # a time unless the product computes rows on its own: a float32 product's rows change with its
            # row count on XLA:CPU, and a prompt's first-token logits must not depend on how many prompts
            # were prefilled beside it, nor on whether the prompt was scored.
            x = jnp.take_along_axis(x, logit_indices[:, :, None], axis=1)
            if rows_independent(cfg):
                logits = project(x)
            else:
                logits = jnp.concatenate([jnp.concatenate([project(x[b:b + 1, j:j + 1]) for j in range(x.shape[1])],
                                                          axis=1) for b in range(x.shape[0])])
        return logits.astype(jnp.float32), cache


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Randomly initialised parameters (tests and shape templates)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = init_cache(cfg, 1, 1)
    return Transformer(cfg).init(rng, tokens, tokens, cache)["params"]


def param_shapes(cfg: ModelConfig) -> Any:
    """The params pytree as ShapeDtypeStructs, without allocating (for loaders and orbax restore)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
