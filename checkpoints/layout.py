"""Map Hugging Face tensor names onto flaxchat's params pytree.

Both importers (safetensors and GGUF) produce tensors under HF names and layouts (``[out, in]``
matrices); this module is the one place that knows how they become linen params (``layers/...``, every
layer's tensor stacked on a leading axis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flaxchat.checkpoints.errors import CheckpointError, first_line
from flaxchat.model.config import ModelConfig
from flaxchat.model.transformer import param_shapes

_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# (params path inside one layer, HF name suffix, is a matrix that needs transposing)
_LAYER_TENSORS: list[tuple[tuple[str, ...], str, bool]] = [
    (("input_norm", "scale"), "input_layernorm.weight", False),
    (("post_attention_norm", "scale"), "post_attention_layernorm.weight", False),
    *((("attn", proj, "kernel"), f"self_attn.{proj}.weight", True) for proj in _ATTENTION_PROJECTIONS),
    *((("attn", proj, "bias"), f"self_attn.{proj}.bias", False) for proj in _ATTENTION_PROJECTIONS),
    *((("attn", norm, "scale"), f"self_attn.{norm}.weight", False) for norm in ("q_norm", "k_norm")),
    *((("mlp", proj, "kernel"), f"mlp.{proj}.weight", True) for proj in ("gate_proj", "up_proj", "down_proj")),
    # Qwen2-MoE's shared expert and its gate (only models whose params have them ask for them)
    *((("mlp", "shared", proj, "kernel"), f"mlp.shared_expert.{proj}.weight", True)
      for proj in ("gate_proj", "up_proj", "down_proj")),
    (("mlp", "shared_gate", "kernel"), "mlp.shared_expert_gate.weight", True),
]
_TOP_TENSORS: list[tuple[tuple[str, ...], str, bool]] = [
    (("embed", "embedding"), "model.embed_tokens.weight", False),
    (("final_norm", "scale"), "model.norm.weight", False),
    (("lm_head", "kernel"), "lm_head.weight", True),
]


# A mixture of experts' tensors by architecture: the MLP's prefix, the router, and each expert's
# gate / up / down projection names.
_EXPERT_NAMES = {
    "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
}


def _load_experts(cfg: ModelConfig, shapes: dict, params: dict, load: Callable) -> None:
    """The router and every expert's projections of every layer, stacked ``[layers, experts, in, out]``."""
    prefix, router, (gate, up, down) = _EXPERT_NAMES[cfg.architecture]
    want = shapes["layers"]["mlp"]["router"]["kernel"]
    layer_want = jax.ShapeDtypeStruct(want.shape[1:], want.dtype)
    params.setdefault("layers", {}).setdefault("mlp", {})["router"] = {"kernel": np.stack(
        [load(f"model.layers.{i}.{prefix}.{router}.weight", True, layer_want) for i in range(cfg.num_layers)])}
    experts = {}
    for ours, theirs in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        want = shapes["layers"]["mlp"]["experts"][ours]
        one = jax.ShapeDtypeStruct(want.shape[2:], want.dtype)
        experts[ours] = np.stack([np.stack([load(f"model.layers.{i}.{prefix}.experts.{e}.{theirs}.weight", True, one)
                                            for e in range(cfg.num_experts)]) for i in range(cfg.num_layers)])
    params["layers"]["mlp"]["experts"] = experts


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def assemble_params(cfg: ModelConfig, fetch: Callable[[str], np.ndarray], source: object) -> dict:
    """Build the params pytree by pulling each HF-named tensor through ``fetch``.

    ``fetch(name)`` returns a float numpy array or raises ``KeyError``. Every tensor is shape-checked
    against the model so a mismatched checkpoint fails loudly instead of loading half a model.
    """
    try:
        shapes = param_shapes(cfg)
    except Exception as exc:  # noqa: BLE001 - a corrupt header's sizes (a zero vocabulary, say) fail here
        raise CheckpointError(source, f"the config describes no buildable model ({first_line(exc)})") from None
    params: dict = {}

    def load(name: str, transpose: bool, want: jax.ShapeDtypeStruct) -> np.ndarray:
        try:
            array = np.asarray(fetch(name))
        except KeyError:
            raise CheckpointError(source, f"tensor {name!r} is missing") from None
        if transpose:
            array = array.T
        if array.shape != tuple(want.shape):
            raise CheckpointError(
                source, f"tensor {name!r} has shape {array.shape}, expected {tuple(want.shape)}"
            )
        if not np.all(np.isfinite(array)):
            raise CheckpointError(source, f"tensor {name!r} contains NaN or infinite values")
        return array.astype(np.float32)  # cast to the param dtype once, on the way to the device

    for path, name, transpose in _TOP_TENSORS:
        want = _get(shapes, path)
        if want is not None:
            _set(params, path, load(name, transpose, want))
    for path, suffix, transpose in _LAYER_TENSORS:
        stacked = _get(shapes["layers"], path)
        if stacked is not None:
            want = jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
            layers = [load(f"model.layers.{i}.{suffix}", transpose, want) for i in range(cfg.num_layers)]
            _set(params, ("layers",) + path, np.stack(layers))
    if cfg.num_experts:
        _load_experts(cfg, shapes, params, load)
    return jax.tree.map(lambda a, s: jax.numpy.asarray(a, dtype=s.dtype), params, shapes)
