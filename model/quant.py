"""int8 weights: per-output-channel symmetric quantisation and the int8 x int8 -> int32 product.

Why this formulation (measured on XLA:CPU, see bench/RESULTS.md): converting int8 weights to float before
the dot makes XLA materialise a float copy of the whole matrix every call (slower than float32), while an
``int8 x int8 -> int32`` dot runs on the integer units (AVX-512 VNNI) reading a quarter of the bytes. So
activations are quantised too, per row (one scale per token, dynamic), and the product is rescaled after.

Invariant that the seed contract relies on: the integer dot is an exact sum, and the quantisation and the
rescale are element-wise per row, so **a row's result does not depend on which or how many other rows are
in the batch** (tests/test_row_buckets.py checks every bucket size). A float32 dot does not have this
property on XLA:CPU (its kernels pick a different summation order for small row counts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_MODES = ("float32", "int8")  # "float32" keeps the checkpoint's floats (exact parity with transformers)

# Params quantised per output channel: the kernels of every projection and the (tied) vocabulary matrix.
_KERNEL = "kernel"
_EMBEDDING = "embedding"


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per row of ``x`` ``[..., K]``: ``x ~= q * scale`` with ``scale`` ``[..., 1]``."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    safe = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale


def int8_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array, transposed: bool = False) -> jax.Array:
    """``x @ (kernel * scale)`` for float ``x`` ``[..., K]`` and int8 ``kernel`` ``[K, N]`` (``[N, K]`` when
    ``transposed``) with per-column float32 ``scale`` ``[N]``; float32 result ``[..., N]``."""
    xq, x_scale = quantize_rows(x)
    contract = ((xq.ndim - 1,), (1 if transposed else 0,))
    acc = jax.lax.dot_general(xq, kernel, (contract, ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * (x_scale * scale)


def quantize_matrix(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales of ``w``, one scale per index of ``axis`` (the output channels)."""
    w = np.asarray(w, np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.max(np.abs(w), axis=reduce, keepdims=True) / 127.0
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=reduce).astype(np.float32)


def quantize_params(params: Any) -> Any:
    """Float params (the stored layout) -> the int8 layout ``Transformer`` expects with ``weights='int8'``.

    Each ``kernel`` ``[in, out]`` becomes ``kernel`` int8 + ``scale`` ``[out]``; the embedding ``[V, H]``
    becomes ``embedding`` int8 + ``scale`` ``[V]`` (per vocabulary row: one scale per logit when tied).
    Norms and biases stay float32. Done on the host in numpy so the float copy never lives on the device.
    """

    def walk(tree: dict) -> dict:
        out: dict = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value)
            elif name == _KERNEL:
                out[_KERNEL], out["scale"] = (jnp.asarray(a) for a in quantize_matrix(np.asarray(value), axis=1))
            elif name == _EMBEDDING:
                out[_EMBEDDING], out["scale"] = (jnp.asarray(a) for a in quantize_matrix(np.asarray(value), axis=0))
            else:
                out[name] = jnp.asarray(value, jnp.float32)
        return out

    return walk(dict(params))


def prepare_weights(cfg: Any, params: Any, weights: str) -> tuple[Any, Any]:
    """The (config, params) pair to run with ``weights`` ("float32" keeps them; "int8" quantises)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
    if weights == cfg.weights:
        return cfg, params
    if cfg.weights != "float32":
        raise ValueError(f"params are already {cfg.weights}; load the float checkpoint to run {weights}")
    return cfg.replace(weights=weights), quantize_params(params)
