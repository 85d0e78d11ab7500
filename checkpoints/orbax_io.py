"""flaxchat's native weight format: an orbax-checkpoint of the params pytree.

Restoring needs only the stored ``config.json`` (for the target shapes and dtypes), never the original
HF/GGUF files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxchat.checkpoints.errors import CheckpointError
from flaxchat.model import sharding
from flaxchat.model.config import ModelConfig
from flaxchat.model.transformer import param_shapes


def save_params(path: str | Path, params: Any) -> None:
    """Write params to ``path`` (must not exist yet); blocks until the write is complete."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()


def _per_layer_layout(shapes: dict, num_layers: int) -> dict:
    """The layout earlier stores used: ``layers_{i}/...``, one tree per layer."""
    out = {k: v for k, v in shapes.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=s.sharding),
                                          shapes["layers"])
    return out


def _stack(params: dict, num_layers: int) -> dict:
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *layers)
    return out


def restore_params(path: str | Path, cfg: ModelConfig, on_device: bool = True,
                   mesh: jax.sharding.Mesh | None = None) -> Any:
    """Read params back with the shapes and dtypes ``cfg`` implies (a dtype change is a cast); as numpy
    arrays with ``on_device=False`` (params that will be quantised on the host: a device copy of the floats
    would only raise the start's peak memory). On a ``mesh``, each array is restored in the layout
    ``model/sharding.py`` gives it: every device reads only its shard, and no host holds a whole array.

    Stores written with the per-layer layout (``layers_{i}``) are read too, and stacked."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(path, "orbax checkpoint directory not found")
    shapes = param_shapes(cfg.replace(weights="float32"))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's (several may restore)
    on_one_device = jax.tree.map(lambda _: device, shapes)
    placements = on_one_device if mesh is None or not on_device else sharding.param_shardings(shapes, cfg, mesh)

    def target_of(where):
        return jax.tree.map(lambda s, w: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=w), shapes, where)

    target = target_of(placements)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path)
            tree = getattr(stored, "item_metadata", stored)
            names = set(tree.keys()) if hasattr(tree, "keys") else set()
            if "layers_0" in names:
                params = _stack(checkpointer.restore(path, _per_layer_layout(target_of(on_one_device), cfg.num_layers)),
                                cfg.num_layers)
            else:
                params = checkpointer.restore(path, target)
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(path, f"cannot restore orbax checkpoint ({type(exc).__name__}: {exc})") from None
    # Arrays as orbax hands them back made every jitted call ~10x slower on XLA:CPU (measured: a decode
    # step of the default model 626 ms vs 67 ms; jnp.array(a, copy=True) kept the slowness); arrays put on
    # the device afresh from host memory run at full speed.
    if not on_device:
        return jax.tree.map(np.asarray, params)
    return jax.tree.map(_fresh_copy, params, placements)


def _fresh_copy(array: Any, where: jax.sharding.Sharding) -> jax.Array:
    """``array`` put on its devices afresh from host memory, one shard at a time (a stacked old-layout store
    arrives as a host array and is split here)."""
    if not isinstance(array, jax.Array) or len(array.sharding.device_set) == 1:
        return jax.device_put(np.asarray(array), where)
    shards = [jax.device_put(np.asarray(shard.data), shard.device) for shard in array.addressable_shards]
    return jax.make_array_from_single_device_arrays(array.shape, where, shards)
