"""Slots over the mesh's ``data`` axis: each data shard owns a contiguous range of slots (``slots / data`` of
them) and runs the device steps on its own rows.

XLA's partitioner cannot know that a step's row indices name rows of the local shard, so a decode bucket
gathered by index out of a ``data``-sharded cache made it all-gather the cache every step (measured on a
2x4 mesh: an ``f32[30, 4, 3, 128, 64]`` all-gather in the decode program). Here the steps run under
``jax.shard_map``, manual over ``data`` only (``model`` stays XLA's to partition): a decode call's rows are
laid out shard by shard (``host_rows``), each shard decodes its own bucket with local slot indices, and the
outputs are put back in the caller's order. A prompt chunk runs on every shard with only the owner's writes
kept (the others address the dropped row past their slots) and the owner's logits returned: prefill is
repeated on each data shard, decode is not. The prefix pool is whole on every shard; a block saved from a
slot, or a slot copied to another shard, crosses as the owner's rows summed with the others' zeros.

The seed contract holds per shard as on one device: a row's bits do not depend on the other rows of its
bucket, and a shard's bucket is just a smaller bucket.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from flaxchat.model.sharding import MeshError

DATA = "data"


class DataShards:
    """The ``data`` axis of ``mesh`` over ``slots`` slots; wraps step implementations to run per shard."""

    def __init__(self, mesh: Mesh, slots: int, spec_of: Callable[[Any], P]):
        """``spec_of(path, leaf)``: a state leaf's full ``PartitionSpec`` (``model/sharding.py``)."""
        self.mesh, self.ways = mesh, mesh.shape[DATA]
        if slots % self.ways:
            raise MeshError(f"{slots} slots cannot be split over a data axis of {self.ways}: use a multiple")
        self.per_shard = slots // self.ways
        self._spec_of = spec_of

    # ---- layout ----------------------------------------------------------------------------------
    def _data_spec(self, path: tuple, leaf: Any) -> P:
        """``leaf``'s spec over ``data`` alone (the manual axis; ``model`` stays automatic)."""
        return P(*(axis if axis == DATA else None for axis in self._spec_of(path, leaf)))

    def _specs(self, tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(self._data_spec, tree)

    def _map(self, local: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        # check_vma=False: the model's loops start from constants and carry per-shard values (the varying-axis
        # checker would want every carry cast); every output either names ``data`` or is passed through.
        return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, axis_names={DATA},
                             check_vma=False)

    def _local(self, slots: jax.Array) -> jax.Array:
        """Global slot indices -> this shard's (the dropped row ``per_shard`` for a slot it does not own)."""
        first = jax.lax.axis_index(DATA) * self.per_shard
        owned = (slots >= first) & (slots < first + self.per_shard)
        return jnp.where(owned, slots - first, self.per_shard)

    def owner(self, slots: jax.Array) -> jax.Array:
        return jnp.clip(slots // self.per_shard, 0, self.ways - 1)

    def host_rows(self, slots: list[int], bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """A decode call's rows, ``[ways * bucket]`` local indices shard by shard (padding: ``per_shard``), and
        where each of ``slots`` went (its column in the call's outputs; the padding columns after)."""
        rows = np.full((self.ways, bucket), self.per_shard, np.int32)
        filled = [0] * self.ways
        order = []
        for slot in slots:
            shard = slot // self.per_shard
            rows[shard, filled[shard]] = slot - shard * self.per_shard
            order.append(shard * bucket + filled[shard])
            filled[shard] += 1
        order += sorted(set(range(self.ways * bucket)) - set(order))
        return rows.reshape(-1), np.asarray(order, np.int32)

    def slot_order(self) -> tuple[int, ...]:
        """Free slots are taken round-robin over the shards (0, per_shard, 2 * per_shard, ..., 1, ...): a
        decode call costs its fullest shard's bucket on every shard."""
        return tuple(shard * self.per_shard + i for i in range(self.per_shard) for shard in range(self.ways))

    def bucket_rows(self, slots: list[int]) -> int:
        """The most live slots any one shard holds."""
        counts = np.bincount(np.asarray(slots, np.int64) // self.per_shard, minlength=self.ways)
        return int(counts.max()) if len(slots) else 1

    # ---- steps -----------------------------------------------------------------------------------
    def decode(self, impl: Callable) -> Callable:
        """``impl(params, state, rows)`` -> ``(outs [steps, rows], state)`` per shard; called as
        ``(params, state, rows, order)`` with ``host_rows``' arrays."""
        def run(params, state, rows, order):
            specs = self._specs(state)
            outs, state = self._map(impl, (P(), specs, P(DATA)), (P(None, DATA), specs))(params, state, rows)
            return jax.tree.map(lambda a: jnp.take(a, order, axis=1), outs), state

        return run

    def prompt(self, impl: Callable, results: int = 1) -> Callable:
        """``impl(params, state, slot(s), ...)`` -> ``(*results, state)``, each result one per slot (a single
        slot: arrays; several: a tuple of them). Every shard runs the chunk; only the owner's writes and
        results count."""
        def run(params, state, slots, *args):
            specs = self._specs(state)

            def local(params, state, slots, *args):
                *outs, state = impl(params, state, self._local(slots), *args)
                return (*jax.tree.map(lambda a: a[None], tuple(outs)), state)

            arg_specs = tuple(P() for _ in args)
            out_specs = (*(P(DATA),) * results, specs)
            *outs, state = self._map(local, (P(), specs, P(), *arg_specs), out_specs)(params, state, slots, *args)
            owners = self.owner(slots)
            if owners.ndim == 0:
                outs = jax.tree.map(lambda a: a[owners], tuple(outs))
            else:  # a tuple of results per slot of the batch
                outs = tuple(tuple(a[owners[i]] for i, a in enumerate(out)) for out in outs)
            return (*outs, state)

        return run

    # ---- the cache copies (the prefix pool is whole on every shard; a slot's rows on its owner only) ------
    def _state_only(self, local: Callable) -> Callable:
        """``local(state, *args)`` -> state, run per shard with the state's data layout."""
        def run(state, *args):
            specs = self._specs(state)
            return self._map(local, (specs, *(P() for _ in args)), specs)(state, *args)

        return run

    def load_blocks(self, impl: Callable) -> Callable:
        """``impl(state, slot, blocks, count)``: pool blocks into a slot. The owner copies from its own whole
        pool; on the other shards ``count`` is 0 (the loop holds no collective, so shards may differ)."""
        def local(state, slot, blocks, count):
            mine = self._local(slot) < self.per_shard
            return impl(state, jnp.where(mine, self._local(slot), 0), blocks, jnp.where(mine, count, 0))

        return self._state_only(local)

    @staticmethod
    def _from_owner(mine: jax.Array) -> Callable[[jax.Array], jax.Array]:
        """Rows read on every shard -> the owner's rows on every shard: the others' zeros summed with them over
        ``data`` (exact: one term is not zero)."""
        return lambda rows: jax.lax.psum(jnp.where(mine, rows, jnp.zeros_like(rows)), DATA)

    def save_blocks(self, impl: Callable) -> Callable:
        """``impl(state, slot, blocks, first, count, share=...)``: a slot's blocks into the pool on every shard,
        each block the owner's (``_from_owner``), so every copy of the pool stays the same; only the saved
        blocks cross shards."""
        def local(state, slot, blocks, first, count):
            mine = self._local(slot) < self.per_shard
            return impl(state, jnp.where(mine, self._local(slot), 0), blocks, first, count,
                        share=self._from_owner(mine))

        return self._state_only(local)

    def copy_slot(self, impl: Callable) -> Callable:
        """``impl(state, dst, src, share=...)``: ``src``'s cache rows to ``dst``, wherever each lives: the
        source owner's rows (``_from_owner``), written by the destination's owner (elsewhere ``dst`` is the
        dropped row)."""
        def local(state, dst, src):
            mine = self._local(src) < self.per_shard
            return impl(state, self._local(dst), jnp.where(mine, self._local(src), 0), share=self._from_owner(mine))

        return self._state_only(local)
