"""Mixtures of experts (Qwen3-MoE, Mixtral, Qwen2-MoE's shared expert): the router and the experts' MLP.

Both keep a row's bits independent of the other rows: the router's scores are products and a fixed-order
sum, and the experts run densely and are combined in a fixed order (``dense_experts``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxchat.model.config import ModelConfig
from flaxchat.model.reductions import tree_sum


def activation(gate: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The gated MLP's activation: silu (SwiGLU) or tanh-approximated gelu (GeGLU, Gemma)."""
    return jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)


def route(x: jax.Array, router: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Each token's weight for each expert, ``[..., experts]``: a float32 softmax over the router's scores,
    the ``experts_per_token`` largest kept (renormalised over them when ``norm_topk_prob``), the rest 0, as
    transformers' Qwen3-MoE and Mixtral route. The scores are products and a fixed-order sum (not a matrix
    product, whose float32 rows change with the row count on XLA:CPU): a token's choice of experts depends on
    its own row only, bit for bit, so no other request can tip it to another expert."""
    scores = tree_sum(x.astype(jnp.float32)[..., :, None] * router.astype(jnp.float32), axis=-2)
    probs = jax.nn.softmax(scores, axis=-1)
    top, chosen = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    # each expert is chosen at most once per token, so this sum only ever adds zeros to one weight
    return jnp.sum(jax.nn.one_hot(chosen, cfg.num_experts, dtype=jnp.float32) * top[..., None], axis=-2)


def dense_experts(x: jax.Array, w: dict, cfg: ModelConfig, layer: jax.Array,
                  shared_mlp: Callable[[jax.Array, Any, int], jax.Array]) -> jax.Array:
    """Mixture of experts, dense over experts: every expert runs on every token and the router's weights
    (0 for experts not chosen) combine them in a fixed order, so a row's result depends on its own tokens
    only, whatever the batch, and the experts axis can be split over a mesh (``model/sharding.py``). It
    costs ``experts / experts_per_token`` times the FLOPs of running only the chosen experts (a grouped
    product over tokens sorted by expert is the faster formulation, not built yet); parity with transformers
    is what this one is for. ``shared_mlp(x, params, width)`` runs Qwen2-MoE's shared expert (a dense gated
    MLP, the decoder's own)."""
    weights = route(x, w["router"]["kernel"][layer], cfg).astype(cfg.dtype)  # [B, T, E]
    experts = w["experts"]
    gate = jnp.einsum("bth,ehi->btei", x, experts["gate_proj"][layer].astype(cfg.dtype))
    up = jnp.einsum("bth,ehi->btei", x, experts["up_proj"][layer].astype(cfg.dtype))
    out = jnp.einsum("btei,eih->bteh", activation(gate, cfg) * up, experts["down_proj"][layer].astype(cfg.dtype))
    out = tree_sum(out * weights[..., None], axis=2)
    if "shared" in w:  # transformers' Qwen2-MoE: experts' sum + sigmoid(gate . x) * shared MLP(x)
        shared = shared_mlp(x, w["shared"], cfg.shared_expert_intermediate_size)
        # the gate's score as products and a fixed-order sum, like the router's (row-independent bits)
        score = tree_sum(x.astype(jnp.float32)[..., :, None] * w["shared_gate"]["kernel"][layer].astype(jnp.float32),
                         axis=-2)
        out = out + jax.nn.sigmoid(score).astype(cfg.dtype) * shared
    return out
