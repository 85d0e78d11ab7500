"""8-bit weights: blocks of 32 along the input dimension, each with a float32 scale and offset.

``W[k, n] = scale[k // 32, n] * codes[k, n] + offset[k // 32, n]`` with uint8 ``codes`` (an asymmetric
block format, like GGUF's Q4_1 but with 8-bit codes), stored in panels of 32 output columns (``codes``
``[N / 32, K, 32]``, ``scale``/``offset`` ``[N / 32, K / 32, 32]``) so the kernel reads each panel
contiguously. Activations stay float32. Why this format (measured on the default model,
bench/RESULTS.md): per-channel int8 with int8 activations kept 1 of 6 greedy continuations of float32's;
weight-only symmetric blocks of 32 (Q8_0-like) 4 of 6; asymmetric blocks 5 of 6, with the log-likelihood
moving < 0.1 % — the default model's weights are 4-bit blocks (Q4_1), which an asymmetric 8-bit block
represents almost exactly. 1.25 bytes per weight instead of 4.

On CPU the product is the kernel ``model/kernels/qmatmul.cc``: it reads each weight byte once and
computes every output as one sequential chain over ``k``, so **a row's bits do not depend on which or
how many rows are in the call** — decode row buckets (one row included) and prefill chunks of any size
keep the seed contract by construction. Elsewhere, or where the kernel cannot be built
(``model.kernels.available()``), the weights are dequantised in the program and multiplied by XLA's dot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import kernels

WEIGHT_MODES = ("float32", "int8")  # "float32" keeps the checkpoint's floats (exact parity with transformers)
WEIGHT_CHOICES = ("auto", *WEIGHT_MODES)
BLOCK = 32  # weights per (scale, offset) pair along the input dimension
PANEL = 32  # output columns per stored panel

_KERNEL = "kernel"
_EMBEDDING = "embedding"
# Projections of the same input stored as one matrix with int8 weights (one kernel call each).
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_name(names: tuple[str, ...]) -> str:
    """``("q_proj", "k_proj", "v_proj")`` -> ``"q_k_v_proj"``."""
    return "_".join(name.removesuffix("_proj") for name in names) + "_proj"


def padded(n: int) -> int:
    """Output columns rounded up to whole panels (the padding columns are zero and sliced off)."""
    return -(-n // PANEL) * PANEL


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` ``[K, N]`` (K a multiple of BLOCK) -> codes ``[N' / 32, K, 32]`` uint8, scale and offset
    ``[N' / 32, K / 32, 32]`` float32, N' = ``padded(N)``.

    Per block: offset = its minimum, scale = (max - min) / 255, codes = round((w - offset) / scale).
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if k % BLOCK:
        raise ValueError(f"int8 weights need the input dimension to be a multiple of {BLOCK}, not {k}")
    w = np.pad(w, ((0, 0), (0, padded(n) - n)))
    panels = w.shape[1] // PANEL
    blocks = w.reshape(k // BLOCK, BLOCK, -1)
    offset = blocks.min(axis=1)
    scale = (blocks.max(axis=1) - offset) / np.float32(255)
    safe = np.where(scale == 0, np.float32(1), scale)
    codes = np.clip(np.rint((blocks - offset[:, None]) / safe[:, None]), 0, 255).astype(np.uint8)

    def to_panels(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(a.shape[0], panels, PANEL).transpose(1, 0, 2))

    return to_panels(codes.reshape(k, -1)), to_panels(scale.astype(np.float32)), to_panels(offset.astype(np.float32))


def dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Float32 weights from codes ``[..., K]`` and scale/offset ``[..., K / 32]`` (same leading dims)."""
    shape = codes.shape
    blocks = codes.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK).astype(jnp.float32)
    return (blocks * scale[..., None] + offset[..., None]).reshape(shape)


def columns(codes: jax.Array, scale: jax.Array, offset: jax.Array, index: jax.Array) -> jax.Array:
    """Columns ``index`` (any shape) of the stored matrix as float32 ``[*index.shape, K]`` (an embedding
    lookup: the tied table is the LM head's ``W``)."""
    panel, lane = index // PANEL, index % PANEL
    pick = lambda a: a[panel, :, lane]  # noqa: E731
    return dequantize(pick(codes), pick(scale), pick(offset))


def _kernel_matmul(x2: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((x2.shape[0], codes.shape[0] * PANEL), jnp.float32)
    return jax.ffi.ffi_call(kernels.QMATMUL_TARGET, out)(x2, codes, scale, offset)


def _xla_matmul(x2: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    per_column = lambda a: a.transpose(0, 2, 1).reshape(-1, a.shape[1])  # noqa: E731  [N', K or K/32]
    w = dequantize(per_column(codes), per_column(scale), per_column(offset))  # [N', K]
    return jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def block_matmul(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array, features: int) -> jax.Array:
    """``x @ W`` for float ``x`` ``[..., K]`` and block-quantised ``W`` ``[K, features]``: float32 ``[..., features]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if kernels.available():
        y = jax.lax.platform_dependent(x2, codes, scale, offset, cpu=_kernel_matmul, default=_xla_matmul)
    else:
        y = _xla_matmul(x2, codes, scale, offset)
    if y.shape[-1] != features:
        y = y[:, :features]
    return y.reshape(*lead, features)


def quantize_params(params: Any) -> Any:
    """Float params (the stored layout) -> the layout ``Transformer`` expects with ``weights='int8'``.

    Each ``kernel`` ``[in, out]`` becomes ``codes``, ``scale`` and ``offset`` in panels (``quantize_blocks``),
    the projections of one input (``FUSED``: q/k/v, gate/up) concatenated into one matrix first;
    the embedding ``[V, H]`` is stored as the tied LM head's ``W = table.T`` ``[H, V]`` and looked up by
    column (``columns``). Norms and biases stay float32. Done on the host in numpy so the float copy never
    lives on the device.
    """

    def quantized(w: np.ndarray) -> dict:
        codes, scale, offset = quantize_blocks(w)
        return {"codes": jnp.asarray(codes), "scale": jnp.asarray(scale), "offset": jnp.asarray(offset)}

    def fuse(tree: dict) -> dict:
        """Concatenate each FUSED group's float kernels (and biases) along the output dimension."""
        tree = dict(tree)
        for names in FUSED:
            if all(isinstance(tree.get(name), dict) and _KERNEL in tree[name] for name in names):
                parts = [tree.pop(name) for name in names]
                group = {_KERNEL: np.concatenate([np.asarray(p[_KERNEL], np.float32) for p in parts], axis=1)}
                if all("bias" in p for p in parts):
                    group["bias"] = np.concatenate([np.asarray(p["bias"], np.float32) for p in parts])
                tree[fused_name(names)] = group
        return tree

    def walk(tree: dict) -> dict:
        out: dict = {}
        for name, value in fuse(tree).items():
            if isinstance(value, dict):
                out[name] = walk(value)
            elif name == _KERNEL:
                out.update(quantized(np.asarray(value, np.float32)))
            elif name == _EMBEDDING:
                out.update(quantized(np.asarray(value, np.float32).T))
            else:
                out[name] = jnp.asarray(value, jnp.float32)
        return out

    return walk(dict(params))


def resolve_weights(choice: str, cfg: Any) -> str:
    """``"auto"`` -> int8 where the kernel runs (CPU, built) and the model's input widths are whole blocks,
    else float32 (accelerators multiply float weights well; the int8 fallback there dequantises)."""
    if choice != "auto":
        return choice
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    fits = all(w % BLOCK == 0 for w in widths)
    return "int8" if fits and jax.default_backend() == "cpu" and kernels.available() else "float32"


def prepare_weights(cfg: Any, params: Any, weights: str) -> tuple[Any, Any]:
    """The (config, params) pair to run with ``weights`` ("float32" keeps them; "int8" quantises; "auto" as
    ``resolve_weights``)."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, not {weights!r}")
    weights = resolve_weights(weights, cfg)
    if weights == cfg.weights:
        return cfg, params
    if cfg.weights != "float32":
        raise ValueError(f"params are already {cfg.weights}; load the float checkpoint to run {weights}")
    return cfg.replace(weights=weights), quantize_params(params)
