"""flaxchat's native weight format: an orbax-checkpoint of the params pytree.

Restoring needs only the stored ``config.json`` (for the target shapes and dtypes), never the original
HF/GGUF files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from checkpoints.errors import CheckpointError
from model.config import ModelConfig
from model.transformer import param_shapes


def save_params(path: str | Path, params: Any) -> None:
    """Write params to ``path`` (must not exist yet); blocks until the write is complete."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()


def restore_params(path: str | Path, cfg: ModelConfig) -> Any:
    """Read params back with the shapes and dtypes ``cfg`` implies (a dtype change is a cast)."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(path, "orbax checkpoint directory not found")
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        param_shapes(cfg),
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(path, f"cannot restore orbax checkpoint ({type(exc).__name__}: {exc})") from None
