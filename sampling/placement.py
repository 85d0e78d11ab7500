"""Where the engine's device arrays live, and how its steps are jitted so they stay there.

On one device (no mesh) nothing is placed and every step is a plain ``jax.jit`` with its state donated: the
one-device programs. On a mesh (``model/sharding.py``) the params and the device state are placed by the
sharding rules, every step hands the state back in the layout it took (so donation reuses the buffers and
no call recompiles for a new layout), logits are gathered whole before sampling, and with a ``data`` axis the
prompt and decode steps run per data shard (``sampling/data_shards.py``). ``EngineSteps`` asks this class
and never looks at the mesh itself.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxchat.model import kernels, sharding
from flaxchat.model.config import ModelConfig
from flaxchat.sampling.data_shards import DataShards


def is_pool(path: tuple) -> bool:
    """Whether a state leaf's path is in ``DecodeState.pool``."""
    return bool(path) and getattr(path[0], "name", None) == "pool"


class Placement:
    def __init__(self, cfg: ModelConfig, mesh: Mesh | None, slots: int):
        self.cfg, self.mesh, self.slots = cfg, mesh, slots
        self.shards = (DataShards(mesh, slots, lambda path, leaf: self.state_sharding(path, leaf).spec)
                       if mesh is not None and mesh.shape["data"] > 1 else None)
        # free slots are taken in this order (round-robin over data shards: a call costs its fullest shard)
        self.slot_order = self.shards.slot_order() if self.shards else tuple(range(slots))

    def params(self, params: Any) -> Any:
        return params if self.mesh is None else sharding.place(params, sharding.param_shardings(params, self.cfg,
                                                                                                 self.mesh))

    def state_sharding(self, path: tuple, leaf: Any) -> NamedSharding:
        """The layout of the state's leaf at ``path`` (the prefix pool's buffers are whole on each data shard).
        The CPU attention kernel is one opaque call per data shard: a cache split by KV heads would be gathered
        before each call, so with the kernels the cache keeps its heads whole."""
        return sharding.state_sharding(leaf, self.cfg, self.mesh, self.slots, split_kv_heads=not kernels.available(),
                                       pool=is_pool(path))

    def init(self, make_state: Callable[[], Any]) -> Any:
        """``make_state()``'s arrays, each device allocating only its shard."""
        if self.mesh is None:
            return make_state()
        shardings = jax.tree_util.tree_map_with_path(self.state_sharding, jax.eval_shape(make_state))
        return jax.jit(make_state, out_shardings=shardings)()

    def jit(self, step: Callable, donated: int, per_shard: str | None = None, results: int = 1) -> Callable:
        """``step`` jitted with argument ``donated`` (the state) donated; on a mesh, the state it returns
        (alone or last) is held to its layout. ``per_shard``: ``"prompt"`` (``results`` per slot) or
        ``"decode"``, or a cache copy (``"load_blocks"``, ``"save_blocks"``, ``"copy_slot"``), run per data
        shard where the mesh has a data axis. The other results (sampled tokens, logits, scores) come back
        whole on every device, so any process of a multi-process mesh can read them."""
        if self.shards and per_shard == "prompt":
            step = self.shards.prompt(step, results=results)
        elif self.shards and per_shard:  # decode, or a cache copy: DataShards' method of that name
            step = getattr(self.shards, per_shard)(step)
        if self.mesh is None:
            return jax.jit(step, donate_argnums=(donated,))

        def laid_out(*args):
            out = step(*args)
            if not isinstance(out, tuple):
                return self._constrain(out)
            return (*self.replicated(out[:-1]), self._constrain(out[-1]))

        return jax.jit(laid_out, donate_argnums=(donated,))

    def _constrain(self, state: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, a: jax.lax.with_sharding_constraint(a, self.state_sharding(path, a)), state)

    def replicated(self, tree: Any) -> Any:
        """``tree``'s arrays whole on every device of the mesh (inside a jitted step)."""
        whole = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, whole), tree)

    def readable(self, tree: Any) -> Any:
        """``tree``'s arrays where this process can read them (outside a step): whole on every device, which
        on a multi-process mesh every process must ask for together."""
        if self.mesh is None:
            return tree
        return jax.jit(lambda t: t, out_shardings=NamedSharding(self.mesh, PartitionSpec()))(tree)

    def whole(self, logits: jax.Array) -> jax.Array:
        """Logits gathered whole on each device of a row before sampling: a vocabulary split over ``model``
        otherwise makes each of the sampler's fixed-order sums a chain of collectives (232 collective-permutes
        a step, measured), and a data shard's sampler skips work by its own rows' settings, which must not
        wait on collectives the other data shards skip."""
        if self.mesh is None:
            return logits
        inside_data_shard = not jax.sharding.get_abstract_mesh().empty  # shard_map's context: the spec alone
        return jax.lax.with_sharding_constraint(
            logits, PartitionSpec() if inside_data_shard else NamedSharding(self.mesh, PartitionSpec()))
