"""Quantised weights: blocks of 32 along the input dimension, each with a float32 scale and offset.

``W[k, n] = scale[k // 32, n] * codes[k, n] + offset[k // 32, n]`` (an asymmetric block format, like
GGUF's Q4_1), stored in panels of 32 output columns so the kernel reads each panel contiguously:
``scale``/``offset`` ``[N / 32, K / 32, 32]`` and codes either

- ``int8``: 8-bit codes ``[N / 32, K, 32]`` (1.25 bytes per weight instead of 4), or
- ``int4``: 4-bit codes two to a byte, ``[N / 32, K, 16]`` (byte ``j`` holds columns ``j`` and ``j + 16``
  of its panel, low nibble first; 0.75 bytes per weight).

Activations stay float32 (prompt chunks may opt into int8 ones: ``ModelConfig.prompt_activations``).
Why this format (measured on the default model, bench/RESULTS.md): per-channel int8 with int8 activations
kept 1 of 6 greedy continuations of float32's; weight-only symmetric blocks of
32 (Q8_0-like) 4 of 6; asymmetric 8-bit blocks 5 of 6, with the log-likelihood moving < 0.1 %. A 4-bit
checkpoint (GGUF Q4_0/Q4_1/Q4_K: every block of 32 is ``d * q + m`` with 16 levels) is held *exactly* by
``int4`` — every weight of the default model comes back bit for bit — so ``auto`` picks it for such a
checkpoint (``exactly_4_bit``), and a one-row decode step, which streams every weight byte once and runs
at memory speed, reads 40 % fewer bytes. The tied embedding / LM head always stays 8-bit (its GGUF blocks
are 8-bit).

On CPU the product is the kernel ``model/kernels/qmatmul.cc``: it reads each weight byte once and
computes every output as one sequential chain over ``k``, so **a row's bits do not depend on which or
how many rows are in the call** — decode row buckets (one row included) and prefill chunks of any size
keep the seed contract by construction. Elsewhere, or where the kernel cannot be built
(``model.kernels.available()``), the weights are dequantised in the program and multiplied by XLA's dot.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model import kernels

WEIGHT_MODES = ("float32", "int8", "int4")  # "float32" keeps the checkpoint's floats (exact parity with transformers)
QUANTISED = ("int8", "int4")
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


def bits_of(weights: str) -> int:
    """Code width of a quantised weight mode."""
    return {"int8": 8, "int4": 4}[weights]


def code_bytes(bits: int) -> int:
    """Bytes of one row ``k`` of a panel's codes."""
    return PANEL * bits // 8


def quantize_blocks(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` ``[K, N]`` (K a multiple of BLOCK) -> codes ``[N' / 32, K, code_bytes(bits)]`` uint8, scale and
    offset ``[N' / 32, K / 32, 32]`` float32, N' = ``padded(N)``.

    Per block: offset = its minimum, scale = (max - min) / (2**bits - 1), codes = round((w - offset) / scale).
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if k % BLOCK:
        raise ValueError(f"quantised weights need the input dimension to be a multiple of {BLOCK}, not {k}")
    w = np.pad(w, ((0, 0), (0, padded(n) - n)))
    panels = w.shape[1] // PANEL
    codes, scale, offset = _block_codes(w, bits)
    codes, scale, offset = codes.astype(np.uint8), scale[:, 0], offset[:, 0]

    def to_panels(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(a.shape[0], panels, PANEL).transpose(1, 0, 2))

    codes = to_panels(codes.reshape(k, -1))
    if bits == 4:
        codes = codes[..., : PANEL // 2] | (codes[..., PANEL // 2:] << 4)
    return codes, to_panels(scale.astype(np.float32)), to_panels(offset.astype(np.float32))


def exactly_4_bit(w: np.ndarray) -> bool:
    """Whether 4-bit blocks (``quantize_blocks(w, 4)``'s scale, offset and codes) give back every weight of
    ``w`` ``[K, N]`` bit for bit: true of a 4-bit checkpoint's weights (where ``scale * code`` is exact, so
    the kernel's fma rounds once, as this check does), false of trained float weights."""
    w = np.asarray(w, np.float32)
    if w.shape[0] % BLOCK:
        return False
    codes, scale, offset = _block_codes(w, 4)
    return bool(np.array_equal(scale * codes + offset, w.reshape(-1, BLOCK, w.shape[1])))


def _block_codes(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of ``BLOCK`` rows of ``w`` ``[K, N]``: codes ``[K / 32, 32, N]`` (float, integral), scale
    and offset ``[K / 32, 1, N]``: offset = the block's minimum, scale = (max - min) / (2**bits - 1)."""
    levels = (1 << bits) - 1
    blocks = w.reshape(-1, BLOCK, w.shape[1])
    offset = blocks.min(axis=1, keepdims=True)
    scale = (blocks.max(axis=1, keepdims=True) - offset) / np.float32(levels)
    codes = np.clip(np.rint((blocks - offset) / np.where(scale == 0, np.float32(1), scale)), 0, levels)
    return codes, scale, offset


def unpacked(codes: Any) -> Any:
    """One code per byte ``[..., K, 32]`` from either layout (numpy or jax)."""
    if codes.shape[-1] == PANEL:
        return codes
    xp = jnp if isinstance(codes, jax.Array) else np
    return xp.concatenate([codes & 15, codes >> 4], axis=-1)


def dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Float32 weights from one-per-byte codes ``[..., K]`` and scale/offset ``[..., K / 32]`` (same
    leading dims)."""
    shape = codes.shape
    blocks = codes.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK).astype(jnp.float32)
    return (blocks * scale[..., None] + offset[..., None]).reshape(shape)


def columns(codes: jax.Array, scale: jax.Array, offset: jax.Array, index: jax.Array) -> jax.Array:
    """Columns ``index`` (any shape) of the stored matrix as float32 ``[*index.shape, K]`` (an embedding
    lookup: the tied table is the LM head's ``W``)."""
    panel, lane = index // PANEL, index % PANEL
    if codes.shape[-1] == PANEL:
        picked = codes[panel, :, lane]
    else:  # column j and j + 16 share a byte
        byte = codes[panel, :, lane % (PANEL // 2)]
        picked = jnp.where((lane < PANEL // 2)[..., None], byte & 15, byte >> 4)
    pick = lambda a: a[panel, :, lane]  # noqa: E731
    return dequantize(picked, pick(scale), pick(offset))


def _kernel_matmul(x2: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array, layer: jax.Array,
                   valid: jax.Array, int8_activations: bool = False) -> jax.Array:
    out = jax.ShapeDtypeStruct((x2.shape[0], codes.shape[1] * PANEL), jnp.float32)
    if codes.shape[-1] == PANEL:
        target = kernels.QMATMUL_TARGET
    else:
        target = kernels.QMATMUL4_Q8_TARGET if int8_activations else kernels.QMATMUL4_TARGET
    return jax.ffi.ffi_call(target, out)(x2, codes, scale, offset, layer, valid)


def _xla_matmul(x2: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array, layer: jax.Array,
                valid: jax.Array | None = None) -> jax.Array:
    """The XLA formulation (GPU, TPU, no kernel): every row is computed, ``valid`` or not."""
    codes, scale, offset = unpacked(codes[layer]), scale[layer], offset[layer]
    per_column = lambda a: a.transpose(0, 2, 1).reshape(-1, a.shape[1])  # noqa: E731  [N', K or K/32]
    w = dequantize(per_column(codes), per_column(scale), per_column(offset))  # [N', K]
    return jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def block_matmul(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array, features: int,
                 layer: jax.Array | None = None, int8_activations: bool = False,
                 valid: jax.Array | None = None) -> jax.Array:
    """``x @ W`` for float ``x`` ``[..., K]`` and block-quantised ``W`` ``[K, features]``: float32 ``[..., features]``.

    With ``layer``, the weights are a stack ``[L, ...]`` (the decoder layers') and ``W`` is layer ``layer``'s;
    the kernel takes the whole stack and the index, so the layer's weights are never copied out.
    ``int8_activations``: with 4-bit codes on the CPU kernel, ``x`` is quantised to int8 per block of 32 and
    the products are summed in integers (twice as fast; prompt chunks opt in: ``ModelConfig.prompt_activations``).
    ``valid`` (bool, ``x``'s leading shape, optional) flags the rows whose results are used: the CPU kernel
    skips padding rows after the last real one (their result is zero), so a padded bucket costs the rows it
    carries; each computed row's bits are the same either way.
    """
    if layer is None:
        codes, scale, offset, layer = codes[None], scale[None], offset[None], 0
    layer = jnp.asarray(layer, jnp.int32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if kernels.available():
        flags = jnp.ones(x2.shape[0], jnp.int32) if valid is None else valid.reshape(-1).astype(jnp.int32)
        kernel = functools.partial(_kernel_matmul, int8_activations=int8_activations)
        y = jax.lax.platform_dependent(x2, codes, scale, offset, layer, flags, cpu=kernel, default=_xla_matmul)
    else:
        y = _xla_matmul(x2, codes, scale, offset, layer)
    if y.shape[-1] != features:
        y = y[:, :features]
    return y.reshape(*lead, features)


LM_HEAD = "lm_head"
# Code width of the embedding and LM head in both quantised modes: GGUF files keep them 8-bit or wider,
# and the vocabulary projection decides every sampled token.
VOCABULARY_BITS = 8


def rows_independent(cfg: Any) -> bool:
    """Whether the model's products compute each row on its own (the quantised weights' kernel), so a row's
    bits never depend on how many rows a product has; float products on XLA:CPU do not promise that."""
    return cfg.weights in QUANTISED and kernels.available()


def quantize_params(params: Any, weights: str = "int8") -> Any:
    """Float params (the stored layout) -> the layout ``Transformer`` expects with ``weights`` (int8/int4).

    Each ``kernel`` ``[in, out]`` (or stack ``[layers, in, out]``) becomes ``codes``, ``scale`` and ``offset`` in
    panels (``quantize_blocks``, per matrix),
    the projections of one input (``FUSED``: q/k/v, gate/up) concatenated into one matrix first;
    the embedding ``[V, H]`` is stored as the tied LM head's ``W = table.T`` ``[H, V]`` and looked up by
    column (``columns``). Norms and biases stay float32. Done on the host in numpy so the float copy never
    lives on the device.
    """
    layer_bits, head_bits = bits_of(weights), VOCABULARY_BITS

    def quantized(w: np.ndarray, bits: int) -> dict:
        """``w`` ``[K, N]``, or a stack of them ``[L, K, N]`` (the decoder layers'), quantised matrix by matrix."""
        parts = [quantize_blocks(m, bits) for m in (w if w.ndim == 3 else [w])]
        stacked = [np.stack(arrays) if w.ndim == 3 else arrays[0] for arrays in zip(*parts)]
        return {name: jnp.asarray(a) for name, a in zip(("codes", "scale", "offset"), stacked)}

    def fuse(tree: dict) -> dict:
        """Concatenate each FUSED group's float kernels (and biases) along the output dimension."""
        tree = dict(tree)
        for names in FUSED:
            if all(isinstance(tree.get(name), dict) and _KERNEL in tree[name] for name in names):
                parts = [tree.pop(name) for name in names]
                group = {_KERNEL: np.concatenate([np.asarray(p[_KERNEL], np.float32) for p in parts], axis=-1)}
                if all("bias" in p for p in parts):
                    group["bias"] = np.concatenate([np.asarray(p["bias"], np.float32) for p in parts], axis=-1)
                tree[fused_name(names)] = group
        return tree

    def walk(tree: dict, bits: int) -> dict:
        out: dict = {}
        for name, value in fuse(tree).items():
            if isinstance(value, dict):
                out[name] = walk(value, head_bits if name == LM_HEAD else bits)
            elif name == _KERNEL:
                out.update(quantized(np.asarray(value, np.float32), bits))
            elif name == _EMBEDDING:
                out.update(quantized(np.asarray(value, np.float32).T, head_bits))
            else:
                out[name] = jnp.asarray(value, jnp.float32)
        return out

    return walk(dict(params), layer_bits)


def layer_kernels(params: Any) -> list[np.ndarray]:
    """The float projection kernels of the decoder layers (not the embedding or LM head)."""
    found = []

    def walk(tree: dict) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                if key != LM_HEAD:
                    walk(value)
            elif key == _KERNEL:
                value = np.asarray(value, np.float32)
                found.extend(value if value.ndim == 3 else [value])  # a stack of layers' matrices, or one

    walk(dict(params))
    return found


def resolve_weights(choice: str, cfg: Any, params: Any = None) -> str:
    """``"auto"`` -> a quantised mode where the kernel runs (CPU, built) and the model's input widths are
    whole blocks, else float32 (accelerators multiply float weights well; the fallback there dequantises).
    The quantised mode is int4 when every layer projection of ``params`` is exactly 4-bit blocks (a Q4
    GGUF: nothing is lost and a decode step reads 40 % fewer bytes), else int8."""
    if getattr(cfg, "num_experts", 0):  # experts are float only (no quantised expert product yet)
        if choice not in ("auto", "float32"):
            raise ValueError(f"weights={choice!r}: mixture-of-experts models run with float weights only")
        return "float32"
    if choice != "auto":
        return choice
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    fits = all(w % BLOCK == 0 for w in widths)
    if not (fits and jax.default_backend() == "cpu" and kernels.available()):
        return "float32"
    if params is not None and cfg.weights == "float32":
        projections = layer_kernels(params)
        if projections and all(exactly_4_bit(w) for w in projections):
            return "int4"
    return "int8"


def prepare_weights(cfg: Any, params: Any, weights: str) -> tuple[Any, Any]:
    """The (config, params) pair to run with ``weights`` ("float32" keeps them; "int8"/"int4" quantise;
    "auto" as ``resolve_weights``)."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, not {weights!r}")
    weights = resolve_weights(weights, cfg, params)
    if weights == cfg.weights:
        return cfg, params
    if cfg.weights != "float32":
        raise ValueError(f"params are already {cfg.weights}; load the float checkpoint to run {weights}")
    return cfg.replace(weights=weights), quantize_params(params, weights)
