"""Where every array lives on a device mesh: one table of logical axes, one table of rules.

Each parameter and device-state axis gets a *logical* name (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``mlp``, ``experts``, ``slots``, ...); ``RULES`` maps logical names to *mesh* axes (``data``, ``model``,
``expert``), as
jax-llm-examples and MaxText do, so the layout is decided in one place and the model code stays free of
sharding. The arrays are placed with ``NamedSharding``s and the jitted steps are partitioned by XLA (GSPMD):
attention heads and the MLP's hidden units over ``model`` (Megatron-style: q/k/v and gate/up split by
output, o/down by input, one all-reduce each), the vocabulary over ``model``, a mixture's experts over
``expert`` (each expert's MLP units still over ``model``), slots over ``data``.

Awkward cases, decided here:

- A head axis is split only when the mesh axis divides its *head count* (not just its width), and the query
  heads only together with the KV heads (each device then holds whole GQA groups). SmolLM2 has 9 heads and 3
  KV heads, so on a ``model`` axis of 2, 4 or 8 its q/k/v/o projections and its KV cache are **replicated**
  over ``model`` (padding heads would change the arithmetic of every layer), while its MLP (1,536 units) and
  vocabulary (49,152) are still split. Llama-3-8B (32 heads, 8 KV heads) splits all of them on a ``model``
  axis of 2, 4 or 8. (vLLM splits the queries and replicates KV heads when the KV heads do not divide; under
  XLA's automatic partitioning that layout made the decode program gather the whole cache every step,
  measured on 4 heads / 2 KV heads over ``model=4``.) ``tests/test_sharding.py`` checks each kind.
- Any other axis that the mesh axis does not divide is replicated (never padded).
- Quantised projections (8-/4-bit blocks, a CPU feature: ``model/quant.py``) are replicated: the CPU kernel is
  one opaque call per matrix, which XLA would feed with gathered shards anyway.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxchat.model.config import ModelConfig

MESH_AXES = ("data", "model", "expert")

# Logical axis -> mesh axis. Every logical name not listed is replicated.
RULES: dict[str, str] = {
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "experts": "expert",
    "slots": "data",
}

# Logical axes of each parameter, found by the end of its path in the params pytree (the stacked decoder
# layers have a leading ``layers`` axis). Projections are ``[in, out]``, biases ``[out]``.
_PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"attn/q_proj/kernel$", ("embed", "heads")),
    (r"attn/(k|v)_proj/kernel$", ("embed", "kv_heads")),
    (r"attn/q_proj/bias$", ("heads",)),
    (r"attn/(k|v)_proj/bias$", ("kv_heads",)),
    (r"attn/o_proj/kernel$", ("heads", "embed")),
    (r"attn/o_proj/bias$", ("embed",)),
    (r"mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"mlp/router/kernel$", ("embed", None)),
    (r"mlp/experts/(gate|up)_proj$", ("experts", "embed", "mlp")),
    (r"mlp/experts/down_proj$", ("experts", "mlp", "embed")),
    (r"mlp/shared/(gate|up)_proj/kernel$", ("embed", "mlp")),  # Qwen2-MoE's shared expert: a dense MLP
    (r"mlp/shared/down_proj/kernel$", ("mlp", "embed")),
    (r"mlp/shared_gate/kernel$", ("embed", None)),
    (r"(scale|bias)$", None),  # norms' scales, other biases: replicated
)

# The KV cache (and the prefix pool) ``[layers, slots, kv_heads, positions, head_dim]``; int8 scales
# ``[layers, slots, kv_heads, positions, groups]``.
CACHE_AXES = ("layers", "slots", "kv_heads", "positions", None)


class MeshError(ValueError):
    """A ``--mesh`` that cannot be built on the devices at hand."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}`` (axes left out have size 1)."""
    shape = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
            raise MeshError(f"bad mesh axis {part!r}: expected NAME=SIZE with NAME one of {', '.join(MESH_AXES)}")
        shape[name] = int(size)
    return shape


def default_mesh_shape(cfg: ModelConfig, devices: int) -> dict[str, int]:
    """All local devices on the ``model`` axis when they divide the heads and KV heads, else one device."""
    if devices > 1 and cfg.num_heads % devices == 0 and cfg.num_kv_heads % devices == 0:
        return {"data": 1, "model": devices}
    return {"data": 1, "model": 1}


def make_mesh(cfg: ModelConfig, spec: str | None = None, devices: list | None = None) -> Mesh | None:
    """The mesh ``spec`` names (``parse_mesh``), or the default one; ``None`` for a single device (nothing
    is placed or partitioned then: the one-device programs, exactly as without a mesh)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh(spec) if spec else default_mesh_shape(cfg, len(devices))
    size = math.prod(shape.values())
    if size > len(devices):
        raise MeshError(f"mesh {format_mesh(shape)} needs {size} devices; {len(devices)} available")
    if size == 1:
        return None
    return Mesh(np.asarray(devices[:size]).reshape(tuple(shape[a] for a in MESH_AXES)), MESH_AXES)


def format_mesh(shape: dict[str, int] | Mesh | None) -> str:
    """``{"data": 2, "model": 4}`` (or a Mesh) -> ``"data=2,model=4"`` (``expert`` only when it is used);
    ``None`` -> ``"data=1,model=1"``."""
    if shape is None:
        shape = dict.fromkeys(MESH_AXES, 1)
    elif isinstance(shape, Mesh):
        shape = dict(shape.shape)
    return ",".join(f"{axis}={shape.get(axis, 1)}" for axis in MESH_AXES if axis != "expert" or shape.get(axis, 1) > 1)


def _counts(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The unit counts a mesh axis must divide to split a logical axis: a head axis splits by whole heads
    (not by its width), and query heads only with their KV heads, so each device holds whole groups."""
    return {"heads": (cfg.num_heads, cfg.num_kv_heads), "kv_heads": (cfg.num_kv_heads,)}


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], cfg: ModelConfig, mesh: Mesh
                   ) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose axes have the logical names ``axes``: each named axis goes to
    its rule's mesh axis where that axis divides it (and its head count), else it is replicated; a mesh axis
    is used once per array."""
    counts, used, spec = _counts(cfg), set(), []
    for name, size in zip(axes, shape):
        mesh_axis = RULES.get(name) if name else None
        ways = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        units = counts.get(name, (size,))
        if ways > 1 and mesh_axis not in used and size % ways == 0 and all(n % ways == 0 for n in units):
            spec.append(mesh_axis)
            used.add(mesh_axis)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def param_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at ``path`` (``None`` for every axis of a replicated one). Quantised
    leaves (``codes``, ``scale``/``offset`` of a block-quantised matrix) are replicated (module docstring)."""
    name = _path_name(path)
    stacked = name.startswith("layers/")
    if re.search(r"/(codes|offset)$", name) or (re.search(r"/scale$", name) and ndim >= 3 + stacked):
        return (None,) * ndim
    for pattern, axes in _PARAM_AXES:
        if re.search(pattern, name):
            if axes is None:
                return (None,) * ndim
            axes = (("layers",) if stacked else ()) + axes
            if len(axes) != ndim:
                raise ValueError(f"parameter {name}: {ndim} axes, the sharding table names {len(axes)}")
            return axes
    raise ValueError(f"parameter {name} has no entry in the sharding table (model/sharding.py)")


def param_shardings(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """A ``NamedSharding`` for every leaf of ``params`` (arrays or ``ShapeDtypeStruct``s)."""
    def one(path, leaf):
        return NamedSharding(mesh, partition_spec(param_axes(path, leaf.ndim), leaf.shape, cfg, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def state_sharding(leaf: Any, cfg: ModelConfig, mesh: Mesh, slots: int, split_kv_heads: bool = True,
                   pool: bool = False) -> NamedSharding:
    """Where one leaf of the engine's device state lives: a cache buffer by ``CACHE_AXES``; a prefix-pool
    buffer (``pool``) the same but whole on every data shard (a prompt on any shard may reuse any block); a
    per-slot array (``[slots, ...]``) by slot over ``data``; anything else replicated. ``split_kv_heads=False``
    keeps every KV head on each ``model`` device (the CPU attention kernel is one opaque call per data shard:
    XLA would gather a head-split cache before every call)."""
    if leaf.ndim == 5:
        axes = CACHE_AXES if split_kv_heads else tuple(None if a == "kv_heads" else a for a in CACHE_AXES)
        if pool:
            axes = tuple(None if a == "slots" else a for a in axes)
    elif leaf.ndim >= 1 and leaf.shape[0] == slots:
        axes = ("slots",) + (None,) * (leaf.ndim - 1)
    else:
        axes = (None,) * leaf.ndim
    return NamedSharding(mesh, partition_spec(axes, leaf.shape, cfg, mesh))


def place(tree: Any, shardings: Any) -> Any:
    """``tree``'s arrays put where ``shardings`` says (host arrays are split on the way, so no device ever
    holds more than its shard)."""
    return jax.tree.map(jax.device_put, tree, shardings)
