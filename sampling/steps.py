"""The jitted device steps of the engine: prefill a chunk of one slot, move prefix blocks between a slot and
the prefix pool, insert a choice into a slot, decode live slots.

Static shapes only: ``B`` slots, a cache of ``max_len`` positions, a prefix pool of fixed-size token blocks,
prefill buckets of powers of four, and decode *row buckets*: a decode call runs only a bucket of rows (the
live slots, named by index, padded to the bucket size), so a lone request does not pay for every slot.
Every per-request setting travels as data in ``DecodeState``, so nothing recompiles while serving; each
trace bumps ``compiles`` so tests and metrics can prove it. Device state is donated on every call.

Which shapes those are, and why each keeps a row's bits (the seed contract): ``sampling/shapes.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from flaxchat.model.config import ModelConfig
from flaxchat.model.kv_cache import entry_bytes
from flaxchat.model.quant import rows_independent
from flaxchat.model.sharding import make_mesh
from flaxchat.model.transformer import KVCache, Transformer, init_cache
from flaxchat.sampling.params import ALL_ALLOWED, bitmask_words
from flaxchat.sampling.placement import Placement
from flaxchat.sampling.sampler import RowRequest, RowSettings, SampleOutput, record_tokens, sample
from flaxchat.sampling.scoring import SCORE_CHUNK, ChunkScores, chunk_scores
from flaxchat.sampling.shapes import (LARGEST_PREFILL_BUCKET, SKIPPED_PADDING_COST, batch_plan, batch_shapes,
                                      first_chunks, prefill_buckets, row_buckets, smallest_prefill_bucket,
                                      smallest_row_bucket)
from flaxchat.sampling.warmup import warm_up


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    pool: KVCache  # the prefix cache's blocks: k is [layers, pool_blocks, kv_heads, block_size, head_dim]
    tokens: jax.Array  # i32 [B] the next input token of each slot
    positions: jax.Array  # i32 [B] where that token goes
    steps: jax.Array  # i32 [B] index t (within the completion) of the next token to sample
    keys: jax.Array  # typed PRNG keys [B]: each slot's choice key
    active: jax.Array  # bool [B]
    rows: RowSettings


class EngineSteps:
    """Compiled steps for one (model, params, slots, max_len, steps_per_call, cache dtype, mesh); where
    their arrays live on a mesh and how each step is jitted to keep them there: ``sampling/placement.py``."""

    def __init__(self, cfg: ModelConfig, params: Any, slots: int, max_len: int, steps_per_call: int = 1,
                 largest_bucket: int = LARGEST_PREFILL_BUCKET, kv_dtype: str | None = None, pool_blocks: int = 0,
                 block_size: int = 16, mesh: Mesh | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.placement = placed = Placement(cfg, mesh, slots)
        self.params = placed.params(params)
        self.slots, self.max_len, self.steps_per_call = slots, max_len, steps_per_call
        self.kv_dtype = kv_dtype or cfg.dtype
        smallest = min(smallest_prefill_bucket(cfg), max_len)
        self.buckets = prefill_buckets(max_len, smallest, max(largest_bucket, smallest))
        # the CPU kernels skip a bucket's padding rows (``Transformer``'s ``valid``) where they run the products
        self.padding_cost = SKIPPED_PADDING_COST if rows_independent(cfg) else 1.0
        self._first_chunks = first_chunks(self.buckets, max_len, padding_cost=self.padding_cost)
        self.pool_blocks, self.block_size = pool_blocks, block_size
        self.score_chunk_size = SCORE_CHUNK
        self.shards, self.slot_order = placed.shards, placed.slot_order
        # a data shard's decode bucket holds its own slots only
        self.row_buckets = row_buckets(self.shards.per_shard if self.shards else slots, smallest_row_bucket(cfg))
        self.model = Transformer(cfg)
        self.compiles = 0
        self.decode_extends_prefix = False  # decoded tokens' KV equals prefill's (measured at warm-up)
        self.lost: str | None = None  # one process's device never becomes unusable for good
        self._prefill = placed.jit(self._prefill_impl, 1, per_shard="prompt")
        self._prefill_batch = placed.jit(self._prefill_batch_impl, 1, per_shard="prompt")
        self._score = placed.jit(self._score_impl, 1, per_shard="prompt", results=2)
        # Batched prefill (prompts, length) shapes: their products have >= smallest_prefill_bucket rows, so
        # they keep a row's bits wherever one-prompt chunks do.
        self.batch_shapes = batch_shapes(slots, smallest, self.buckets[-1])
        self._insert = placed.jit(self._insert_impl, 0)
        self._copy_slot = placed.jit(self._copy_slot_impl, 0, per_shard="copy_slot")
        self._load_blocks = placed.jit(self._load_blocks_impl, 0, per_shard="load_blocks")
        self._save_blocks = placed.jit(self._save_blocks_impl, 0, per_shard="save_blocks")
        self._decode = {k: placed.jit(functools.partial(self._decode_impl, k), 1, per_shard="decode")
                        for k in sorted({1, steps_per_call})}
        self._release = placed.jit(self._release_impl, 0)
        self._set_allowed = placed.jit(self._set_allowed_impl, 0)

    @classmethod
    def for_engine(cls, cfg: ModelConfig, params: Any, max_len: int, config: Any) -> "EngineSteps":
        """The steps an ``EngineConfig`` asks for (its prefix cache's megabytes become pool blocks)."""
        kv_dtype = config.kv_dtype or cfg.dtype
        pool_blocks = int(config.prefix_cache_mb * 2**20 // cls.pool_block_bytes(cfg, kv_dtype, config.prefix_block))
        return cls(cfg, params, config.slots, max_len, config.steps_per_call, config.largest_prefill_bucket, kv_dtype,
                   pool_blocks, config.prefix_block, make_mesh(cfg, config.mesh))

    # ---- state -----------------------------------------------------------------------------------
    def init_state(self) -> DecodeState:
        """Fresh device state (on a mesh each device allocates only its shard)."""
        return self.placement.init(self._init_state_impl)

    def _init_state_impl(self) -> DecodeState:
        b, v = self.slots, self.cfg.vocab_size
        rows = RowSettings(
            temperature=jnp.zeros(b, jnp.float32), top_p=jnp.ones(b, jnp.float32), top_k=jnp.zeros(b, jnp.int32),
            min_p=jnp.zeros(b, jnp.float32), presence=jnp.zeros(b, jnp.float32), frequency=jnp.zeros(b, jnp.float32),
            repetition=jnp.ones(b, jnp.float32), bias=jnp.zeros((b, v), jnp.float32),
            allowed=jnp.full((b, bitmask_words(v)), ALL_ALLOWED, jnp.uint32),
            counts=jnp.zeros((b, v), jnp.int32), seen=jnp.zeros((b, v), bool), top_logprobs=jnp.zeros(b, jnp.int32),
        )
        pool = init_cache(self.cfg, max(self.pool_blocks, 1), self.block_size, self.kv_dtype)
        return DecodeState(
            cache=init_cache(self.cfg, b, self.max_len, self.kv_dtype), pool=pool, tokens=jnp.zeros(b, jnp.int32),
            positions=jnp.zeros(b, jnp.int32), steps=jnp.zeros(b, jnp.int32),
            keys=jax.random.split(jax.random.key(0), b), active=jnp.zeros(b, bool), rows=rows,
        )

    # ---- jitted implementations ------------------------------------------------------------------
    def _prefill_impl(self, params, state: DecodeState, slot, tokens, start, length):
        """Run one prompt chunk (``tokens`` ``[1, bucket]`` at ``start``) into ``slot``'s cache.

        Returns the logits of the chunk's last real token. Only this slot's cache rows are read or
        written, so the result never depends on the other slots.
        """
        self.compiles += 1
        positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        last = jnp.clip(length - 1 - start, 0, tokens.shape[1] - 1).reshape(1, 1)
        logits, cache = self.model.apply({"params": params}, tokens, positions, state.cache, logit_indices=last,
                                         rows=slot[None], valid=positions < length)
        return logits[0, 0], state.replace(cache=cache)

    def _prefill_batch_impl(self, params, state: DecodeState, slots, tokens, starts, lengths):
        """Several prompts' last chunks at once: row ``i`` of ``tokens`` (``[P, T]``) goes into ``slots[i]`` at
        ``starts[i]``; returns each row's logits at its prompt's last token. A padding row names slot
        ``B`` (its cache writes are dropped)."""
        self.compiles += 1
        positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        last = jnp.clip(lengths - 1 - starts, 0, tokens.shape[1] - 1)[:, None]
        valid = (positions < lengths[:, None]) & (slots < state.tokens.shape[0])[:, None]
        logits, cache = self.model.apply({"params": params}, tokens, positions, state.cache, logit_indices=last,
                                         rows=slots, valid=valid)
        return tuple(logits[i, 0] for i in range(tokens.shape[0])), state.replace(cache=cache)

    def _score_impl(self, params, state: DecodeState, slot, tokens, next_tokens, start, length):
        """``_prefill_impl`` for a chunk of ``SCORE_CHUNK`` tokens that also scores each one's next token."""
        self.compiles += 1
        positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        logits, cache = self.model.apply({"params": params}, tokens, positions, state.cache,
                                         logit_indices=jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], rows=slot[None],
                                         valid=positions < length)
        last = jnp.clip(length - 1 - start, 0, tokens.shape[1] - 1)
        return chunk_scores(logits[0], next_tokens), logits[0, last], state.replace(cache=cache)

    def _copy_slot_impl(self, state: DecodeState, dst, src, share=lambda rows: rows):
        """Copy ``src``'s cache rows to ``dst`` (the other choices of an ``n > 1`` request share its prompt).
        ``share``: what a data shard does to the rows (``sampling/data_shards.py``); a ``dst`` past the
        slots writes nothing."""
        self.compiles += 1
        return state.replace(cache=jax.tree.map(lambda a: a.at[:, dst].set(share(a[:, src]), mode="drop"),
                                                state.cache))

    def _load_blocks_impl(self, state: DecodeState, slot, blocks, count):
        """Copy pool blocks ``blocks[:count]`` (every layer's) into ``slot``'s cache at positions
        ``[0, count * block_size)``."""
        self.compiles += 1
        size = self.block_size

        def one(i, cache):
            def put(buffer, pool):  # [L, slots, KV, S(, D)] <- [L, blocks, KV, size(, D)]
                block = jax.lax.dynamic_index_in_dim(pool, blocks[i], axis=1, keepdims=True)
                return jax.lax.dynamic_update_slice(buffer, block, (0, slot, 0, i * size) + (0,) * (buffer.ndim - 4))

            return jax.tree.map(put, cache, state.pool)

        return state.replace(cache=jax.lax.fori_loop(0, count, one, state.cache))

    def _save_blocks_impl(self, state: DecodeState, slot, blocks, first, count, share=lambda block: block):
        """Copy ``slot``'s cache blocks ``first .. first + count - 1`` (every layer's) into pool blocks
        ``blocks[:count]`` (``share``: what a data shard does to each block, ``sampling/data_shards.py``)."""
        self.compiles += 1
        size = self.block_size

        def one(i, pool):
            def put(blocks_buffer, buffer):
                tail = (0,) * (buffer.ndim - 4)
                block = jax.lax.dynamic_slice(buffer, (0, slot, 0, (first + i) * size) + tail,
                                              (buffer.shape[0], 1, buffer.shape[2], size) + buffer.shape[4:])
                return jax.lax.dynamic_update_slice(blocks_buffer, share(block), (0, blocks[i], 0, 0) + tail)

            return jax.tree.map(put, pool, state.cache)

        return state.replace(pool=jax.lax.fori_loop(0, count, one, state.pool))

    def _insert_impl(self, state: DecodeState, slot, logits, row: RowRequest, choice_key, prompt_len):
        """Start a choice in ``slot`` (whose cache holds the prompt): sample its first token with
        ``fold_in(choice_key, 0)`` and set the slot's settings."""
        self.compiles += 1
        one = RowSettings(
            temperature=row.temperature[None], top_p=row.top_p[None], top_k=row.top_k[None], min_p=row.min_p[None],
            presence=row.presence[None], frequency=row.frequency[None], repetition=row.repetition[None],
            bias=row.bias[None], allowed=row.allowed[None], counts=jnp.zeros_like(row.bias, jnp.int32)[None],
            seen=row.seen[None], top_logprobs=row.top_logprobs[None],
        )
        out = sample(self.placement.whole(logits)[None], one, jax.random.fold_in(choice_key, 0)[None])
        one = record_tokens(one, out.tokens, jnp.ones(1, bool))
        rows = jax.tree.map(lambda all_rows, new: all_rows.at[slot].set(new[0]), state.rows, one)
        state = state.replace(
            rows=rows, tokens=state.tokens.at[slot].set(out.tokens[0]),
            positions=state.positions.at[slot].set(prompt_len), steps=state.steps.at[slot].set(1),
            keys=state.keys.at[slot].set(choice_key), active=state.active.at[slot].set(True),
        )
        return out, state

    def _decode_impl(self, steps: int, params, state: DecodeState, rows):
        """``steps`` decode steps over the slots ``rows`` (``[bucket]``; an index of ``slots`` pads; on a data
        shard, the shard's own slots).

        The bucket's per-row state is gathered, stepped and scattered back; the model reads and writes
        cache rows by index, so no cache row moves. Padding rows are inactive: their cache writes are
        dropped and their outputs ignored.
        """
        self.compiles += 1
        take = lambda a: jnp.take(a, rows, axis=0, mode="clip")  # noqa: E731
        active = jnp.take(state.active, rows, mode="fill", fill_value=False)
        sub = state.replace(cache=None, tokens=take(state.tokens), positions=jnp.where(active, take(state.positions), 0),
                            steps=take(state.steps), keys=take(state.keys), active=active,
                            rows=jax.tree.map(take, state.rows))

        def one_step(carry, _):
            sub, cache = carry
            logits, cache = self.model.apply({"params": params}, sub.tokens[:, None], sub.positions[:, None], cache,
                                             rows=jnp.where(sub.active, rows, state.tokens.shape[0]),
                                             valid=sub.active[:, None])
            keys = jax.vmap(jax.random.fold_in)(sub.keys, sub.steps)
            out = sample(self.placement.whole(logits[:, 0]), sub.rows, keys)
            live = sub.active
            sub = sub.replace(
                rows=record_tokens(sub.rows, out.tokens, live),
                tokens=jnp.where(live, out.tokens, sub.tokens),
                positions=sub.positions + live,
                steps=sub.steps + live,
            )
            return (sub, cache), out

        (sub, cache), outs = jax.lax.scan(one_step, (sub, state.cache), None, length=steps)
        put = lambda whole, part: whole.at[rows].set(part, mode="drop")  # noqa: E731
        # Only the history changes while decoding; scattering the unchanged [B, V] settings back made XLA
        # copy them twice per call (bias and allowed: ~6 MB).
        history = state.rows.replace(counts=put(state.rows.counts, sub.rows.counts),
                                     seen=put(state.rows.seen, sub.rows.seen))
        state = state.replace(
            cache=cache, tokens=put(state.tokens, sub.tokens), positions=put(state.positions, sub.positions),
            steps=put(state.steps, sub.steps), rows=history,
        )
        return outs, state

    def _release_impl(self, state: DecodeState, slot):
        self.compiles += 1
        rows = state.rows.replace(top_logprobs=state.rows.top_logprobs.at[slot].set(0))  # padding rows copy it
        return state.replace(active=state.active.at[slot].set(False), positions=state.positions.at[slot].set(0),
                             steps=state.steps.at[slot].set(0), rows=rows)

    def _set_allowed_impl(self, state: DecodeState, allowed, update):
        """Replace the allowed-token bitmask of the rows flagged in ``update`` (constrained rows, each step)."""
        self.compiles += 1
        rows = state.rows
        return state.replace(rows=rows.replace(allowed=jnp.where(update[:, None], allowed, rows.allowed)))

    # ---- host-facing wrappers --------------------------------------------------------------------
    def bucket_for(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def chunk_length(self, n: int) -> int:
        """How many of ``n`` prompt tokens to prefill in the next call: the first call of the cheapest split
        into buckets (``sampling/shapes.first_chunks``: a padded row costs as much as a real one, a call a few
        rows' worth)."""
        return self._first_chunks[min(n, len(self._first_chunks) - 1)]

    def row_bucket_for(self, n: int) -> int:
        """The bucket of a decode call over ``n`` rows (of one data shard's, on a data mesh)."""
        return next((b for b in self.row_buckets if b >= n), self.row_buckets[-1])

    def prefill_chunk(self, state: DecodeState, slot: int, prompt: list[int], start: int,
                      size: int) -> tuple[jax.Array, DecodeState]:
        """Prefill ``prompt[start:start + size]`` into ``slot`` (whose cache holds ``prompt[:start]``); returns
        the logits of the prompt's last token when this chunk holds it. ``size`` is capped at the largest
        bucket."""
        chunk = prompt[start:start + min(size, self.buckets[-1])]
        padded = np.zeros((1, self.bucket_for(len(chunk))), np.int32)
        padded[0, : len(chunk)] = chunk
        return self._prefill(self.params, state, jnp.int32(slot), jnp.asarray(padded), jnp.int32(start),
                             jnp.int32(len(prompt)))

    def score_chunk(self, state: DecodeState, slot: int, prompt: list[int], start: int
                    ) -> tuple[ChunkScores, jax.Array, DecodeState]:
        """``prefill_chunk`` of up to ``SCORE_CHUNK`` tokens from ``start`` that also scores them (``sampling/
        scoring.py``); the last logits are meaningful when the chunk holds the prompt's last token."""
        chunk, following = prompt[start:start + SCORE_CHUNK], prompt[start + 1:start + SCORE_CHUNK + 1]
        padded, next_tokens = np.zeros((1, SCORE_CHUNK), np.int32), np.zeros(SCORE_CHUNK, np.int32)
        padded[0, : len(chunk)], next_tokens[: len(following)] = chunk, following
        return self._score(self.params, state, jnp.int32(slot), jnp.asarray(padded), jnp.asarray(next_tokens),
                           jnp.int32(start), jnp.int32(len(prompt)))

    def batch_plan(self, rests: list[int]) -> tuple[tuple[int, int], int] | None:
        """The batched prefill call for prompts with ``rests`` tokens to go (``sampling/shapes.batch_plan``)."""
        return batch_plan(self.batch_shapes, rests, self.padding_cost)

    def prefill_batch(self, state: DecodeState, parts: list[tuple[int, list[int], int]], shape: tuple[int, int]
                      ) -> tuple[tuple[jax.Array, ...], DecodeState]:
        """Prefill the rest of several prompts in one call of ``shape`` (one of ``batch_shapes``: prompts,
        length): ``parts`` are ``(slot, prompt, start)`` with ``len(prompt) - start`` within the length.
        Returns each part's last-token logits, in order."""
        rows, length = shape
        slots, starts = np.full(rows, self.slots, np.int32), np.zeros(rows, np.int32)
        lengths, tokens = np.ones(rows, np.int32), np.zeros((rows, length), np.int32)
        for i, (slot, prompt, start) in enumerate(parts):
            slots[i], starts[i], lengths[i] = slot, start, len(prompt)
            tokens[i, : len(prompt) - start] = prompt[start:]
        logits, state = self._prefill_batch(self.params, state, jnp.asarray(slots), jnp.asarray(tokens),
                                            jnp.asarray(starts), jnp.asarray(lengths))
        return logits[: len(parts)], state

    def prefill(self, state: DecodeState, slot: int, prompt: list[int], start: int = 0) -> tuple[jax.Array, DecodeState]:
        """Prefill ``prompt[start:]`` into ``slot`` in chunks (``chunk_length``)."""
        logits = None
        while start < len(prompt):
            size = self.chunk_length(len(prompt) - start)
            logits, state = self.prefill_chunk(state, slot, prompt, start, size)
            start += size
        return logits, state

    def _block_list(self, blocks: list[int]) -> jax.Array:
        padded = np.zeros(self.max_len // self.block_size, np.int32)
        padded[: len(blocks)] = blocks
        return jnp.asarray(padded)

    def load_blocks(self, state: DecodeState, slot: int, blocks: list[int]) -> DecodeState:
        """Fill the first ``len(blocks)`` blocks of ``slot``'s cache from the prefix pool."""
        return self._load_blocks(state, jnp.int32(slot), self._block_list(blocks), jnp.int32(len(blocks)))

    def save_blocks(self, state: DecodeState, slot: int, first: int, blocks: list[int]) -> DecodeState:
        """Copy ``slot``'s cache blocks ``first, first + 1, ...`` (prefilled) into the pool blocks ``blocks``."""
        return self._save_blocks(state, jnp.int32(slot), self._block_list(blocks), jnp.int32(first),
                                 jnp.int32(len(blocks)))

    @property
    def block_bytes(self) -> int:
        return self.pool_block_bytes(self.cfg, self.kv_dtype, self.block_size)

    @staticmethod
    def pool_block_bytes(cfg: ModelConfig, kv_dtype: Any, block_size: int) -> int:
        """Device bytes of one prefix-pool block (keys and values of every layer)."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * entry_bytes(kv_dtype, cfg.head_dim)

    def copy_slot(self, state: DecodeState, dst: int, src: int) -> DecodeState:
        return self._copy_slot(state, jnp.int32(dst), jnp.int32(src))

    def insert(self, state, slot, logits, row: RowRequest, choice_key, prompt_len):
        return self._insert(state, jnp.int32(slot), logits, row, choice_key, jnp.int32(prompt_len))

    def decode(self, state: DecodeState, slots: list[int] | None = None, steps: int | None = None,
               bucket: int | None = None) -> tuple[SampleOutput, DecodeState]:
        """Decode the live ``slots`` (default: all) for ``steps`` steps (default ``steps_per_call``) in the
        smallest row bucket that holds them (or ``bucket``: warm-up).

        Outputs are ``[steps, bucket]`` (``[steps, data * bucket]`` on a data mesh); column ``j`` belongs to
        ``slots[j]`` (columns past ``len(slots)`` are padding).
        """
        slots = list(range(self.slots)) if slots is None else list(slots)
        # The prefix pool stays out of the call and ``rows`` goes in as numpy: each argument buffer costs
        # the host time per call (the pool's 2 x layers buffers ~0.5 ms, ``jnp.asarray`` ~0.3 ms), and a
        # one-row step is ~12 ms.
        call = self._decode[steps or self.steps_per_call]
        if self.shards:
            rows, order = self.shards.host_rows(slots, bucket or self.row_bucket_for(self.shards.bucket_rows(slots)))
            outs, state_out = call(self.params, state.replace(pool=None), rows, order)
        else:
            rows = np.full(bucket or self.row_bucket_for(max(len(slots), 1)), self.slots, np.int32)
            rows[: len(slots)] = slots
            outs, state_out = call(self.params, state.replace(pool=None), rows)
        return outs, state_out.replace(pool=state.pool)

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        return self._release(state, jnp.int32(slot))

    def set_allowed(self, state: DecodeState, masks: dict[int, np.ndarray]) -> DecodeState:
        """Upload next-token bitmasks for some slots (one host->device copy for all of them)."""
        allowed = np.full((self.slots, bitmask_words(self.cfg.vocab_size)), ALL_ALLOWED, np.uint32)
        update = np.zeros(self.slots, bool)
        for slot, mask in masks.items():
            allowed[slot], update[slot] = mask, True
        return self._set_allowed(state, jnp.asarray(allowed), jnp.asarray(update))

    def close(self) -> None:
        """Nothing to let go of: the state is the engine's, the compiled steps live as long as this object."""

    def failed(self, error: Exception) -> None:
        """One process's failed step leaves the device usable (the engine rebuilds a consumed state)."""

    @property
    def step_counts(self) -> tuple[int, ...]:
        """The decode variants: steps per call (1, and ``steps_per_call``)."""
        return tuple(self._decode)

    def warmup(self, progress: bool = False, compile_all: bool = True) -> DecodeState:
        """Compile every step now (``sampling/warmup.py``), or with ``compile_all=False`` only run the KV
        agreement check; sets ``decode_extends_prefix``."""
        self.decode_extends_prefix, state = warm_up(self, progress, compile_all)
        return state
