"""The jitted device steps of the engine: prefill one slot, insert a choice into a slot, decode all slots.

Static shapes only: ``B`` slots, a cache of ``max_len`` positions, prefill buckets of powers of two.
Every per-request setting travels as data in ``DecodeState``, so nothing recompiles while serving; each
trace bumps ``compiles`` so tests and metrics can prove it. Device state is donated on every call.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import KVCache, Transformer, init_cache
from sampling.sampler import RowSettings, SampleOutput, record_tokens, sample


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # i32 [B] the next input token of each slot
    positions: jax.Array  # i32 [B] where that token goes
    steps: jax.Array  # i32 [B] index t (within the completion) of the next token to sample
    keys: jax.Array  # typed PRNG keys [B]: each slot's choice key
    active: jax.Array  # bool [B]
    rows: RowSettings


@flax.struct.dataclass
class RowRequest:
    """One choice's settings for ``insert`` (scalars and ``[V]`` rows)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    bias: jax.Array  # f32 [V]
    seen: jax.Array  # bool [V] prompt tokens
    allowed: jax.Array  # u32 [W]


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def prefill_buckets(max_len: int, smallest: int = 16, largest: int = 1024) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to min(max_len, largest); longer prompts go in chunks."""
    buckets, size = [], smallest
    while size < min(max_len, largest):
        buckets.append(size)
        size *= 2
    buckets.append(min(max_len, largest))
    return tuple(buckets)


class EngineSteps:
    """Compiled steps for one (model, params, B, max_len, steps_per_call)."""

    def __init__(self, cfg: ModelConfig, params: Any, slots: int, max_len: int, steps_per_call: int = 1,
                 largest_bucket: int = 1024):
        self.cfg, self.params = cfg, params
        self.slots, self.max_len, self.steps_per_call = slots, max_len, steps_per_call
        self.buckets = prefill_buckets(max_len, largest=largest_bucket)
        self.model = Transformer(cfg)
        self.compiles = 0
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,))
        self._insert = jax.jit(self._insert_impl, donate_argnums=(0,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))
        self._release = jax.jit(self._release_impl, donate_argnums=(0,))
        self._set_allowed = jax.jit(self._set_allowed_impl, donate_argnums=(0,))

    # ---- state -----------------------------------------------------------------------------------
    def init_state(self) -> DecodeState:
        b, v = self.slots, self.cfg.vocab_size
        rows = RowSettings(
            temperature=jnp.zeros(b, jnp.float32), top_p=jnp.ones(b, jnp.float32), top_k=jnp.zeros(b, jnp.int32),
            min_p=jnp.zeros(b, jnp.float32), presence=jnp.zeros(b, jnp.float32), frequency=jnp.zeros(b, jnp.float32),
            repetition=jnp.ones(b, jnp.float32), bias=jnp.zeros((b, v), jnp.float32),
            allowed=jnp.full((b, bitmask_words(v)), 0xFFFFFFFF, jnp.uint32),
            counts=jnp.zeros((b, v), jnp.int32), seen=jnp.zeros((b, v), bool),
        )
        return DecodeState(
            cache=init_cache(self.cfg, b, self.max_len), tokens=jnp.zeros(b, jnp.int32),
            positions=jnp.zeros(b, jnp.int32), steps=jnp.zeros(b, jnp.int32),
            keys=jax.random.split(jax.random.key(0), b), active=jnp.zeros(b, bool), rows=rows,
        )

    # ---- jitted implementations ------------------------------------------------------------------
    def _prefill_impl(self, params, state: DecodeState, slot, tokens, start, length):
        """Run one prompt chunk (``tokens`` ``[1, bucket]`` at ``start``) into ``slot``'s cache.

        Returns the logits of the chunk's last real token. Only this slot's cache is read or written, so
        the result never depends on the other slots.
        """
        self.compiles += 1
        k = jax.lax.dynamic_slice_in_dim(state.cache.k, slot, 1, axis=1)
        v = jax.lax.dynamic_slice_in_dim(state.cache.v, slot, 1, axis=1)
        positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        last = jnp.clip(length - 1 - start, 0, tokens.shape[1] - 1).reshape(1, 1)
        logits, cache = self.model.apply({"params": params}, tokens, positions, KVCache(k, v), logit_indices=last)
        new_cache = KVCache(
            jax.lax.dynamic_update_slice_in_dim(state.cache.k, cache.k, slot, axis=1),
            jax.lax.dynamic_update_slice_in_dim(state.cache.v, cache.v, slot, axis=1),
        )
        return logits[0, 0], state.replace(cache=new_cache)

    def _insert_impl(self, state: DecodeState, slot, src_slot, logits, row: RowRequest, choice_key, prompt_len):
        """Start a choice in ``slot`` from the prompt prefilled in ``src_slot``: copy the KV cache, sample the
        first token with ``fold_in(choice_key, 0)`` and set the slot's settings."""
        self.compiles += 1
        cache = state.cache
        k_src = jax.lax.dynamic_slice_in_dim(cache.k, src_slot, 1, axis=1)
        v_src = jax.lax.dynamic_slice_in_dim(cache.v, src_slot, 1, axis=1)
        cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k_src, slot, axis=1),
                        jax.lax.dynamic_update_slice_in_dim(cache.v, v_src, slot, axis=1))
        one = RowSettings(
            temperature=row.temperature[None], top_p=row.top_p[None], top_k=row.top_k[None], min_p=row.min_p[None],
            presence=row.presence[None], frequency=row.frequency[None], repetition=row.repetition[None],
            bias=row.bias[None], allowed=row.allowed[None], counts=jnp.zeros_like(row.bias, jnp.int32)[None],
            seen=row.seen[None],
        )
        out = sample(logits[None], one, jax.random.fold_in(choice_key, 0)[None])
        one = record_tokens(one, out.tokens, jnp.ones(1, bool))
        rows = jax.tree.map(lambda all_rows, new: all_rows.at[slot].set(new[0]), state.rows, one)
        state = state.replace(
            cache=cache, rows=rows, tokens=state.tokens.at[slot].set(out.tokens[0]),
            positions=state.positions.at[slot].set(prompt_len), steps=state.steps.at[slot].set(1),
            keys=state.keys.at[slot].set(choice_key), active=state.active.at[slot].set(True),
        )
        return out, state

    def _decode_impl(self, params, state: DecodeState):
        """``steps_per_call`` decode steps over all slots; inactive slots compute but change nothing."""
        self.compiles += 1

        def one_step(state: DecodeState, _):
            logits, cache = self.model.apply(
                {"params": params}, state.tokens[:, None], state.positions[:, None], state.cache
            )
            keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)
            out = sample(logits[:, 0], state.rows, keys)
            active = state.active
            state = state.replace(
                cache=cache,
                rows=record_tokens(state.rows, out.tokens, active),
                tokens=jnp.where(active, out.tokens, state.tokens),
                positions=state.positions + active,
                steps=state.steps + active,
            )
            return state, out

        state, outs = jax.lax.scan(one_step, state, None, length=self.steps_per_call)
        return outs, state

    def _release_impl(self, state: DecodeState, slot):
        self.compiles += 1
        return state.replace(active=state.active.at[slot].set(False), positions=state.positions.at[slot].set(0),
                             steps=state.steps.at[slot].set(0))

    def _set_allowed_impl(self, state: DecodeState, allowed, update):
        """Replace the allowed-token bitmask of the rows flagged in ``update`` (constrained rows, each step)."""
        self.compiles += 1
        rows = state.rows
        return state.replace(rows=rows.replace(allowed=jnp.where(update[:, None], allowed, rows.allowed)))

    # ---- host-facing wrappers --------------------------------------------------------------------
    def bucket_for(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def prefill(self, state: DecodeState, slot: int, prompt: list[int]) -> tuple[jax.Array, DecodeState]:
        """Prefill a whole prompt into ``slot`` (in chunks of the largest bucket if it is longer)."""
        largest = self.buckets[-1]
        logits = None
        for start in range(0, len(prompt), largest):
            chunk = prompt[start:start + largest]
            padded = np.zeros((1, self.bucket_for(len(chunk))), np.int32)
            padded[0, : len(chunk)] = chunk
            logits, state = self._prefill(self.params, state, jnp.int32(slot), jnp.asarray(padded),
                                          jnp.int32(start), jnp.int32(len(prompt)))
        return logits, state

    def insert(self, state, slot, src_slot, logits, row: RowRequest, choice_key, prompt_len):
        return self._insert(state, jnp.int32(slot), jnp.int32(src_slot), logits, row, choice_key,
                            jnp.int32(prompt_len))

    def decode(self, state: DecodeState) -> tuple[SampleOutput, DecodeState]:
        return self._decode(self.params, state)

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        return self._release(state, jnp.int32(slot))

    def set_allowed(self, state: DecodeState, masks: dict[int, np.ndarray]) -> DecodeState:
        """Upload next-token bitmasks for some slots (one host->device copy for all of them)."""
        allowed = np.full((self.slots, bitmask_words(self.cfg.vocab_size)), 0xFFFFFFFF, np.uint32)
        update = np.zeros(self.slots, bool)
        for slot, mask in masks.items():
            allowed[slot], update[slot] = mask, True
        return self._set_allowed(state, jnp.asarray(allowed), jnp.asarray(update))

    def warmup(self) -> DecodeState:
        """Compile every bucket, insert, decode and release now, so serving never compiles."""
        state = self.init_state()
        v = self.cfg.vocab_size
        row = make_row_request(v, temperature=1.0)
        for bucket in self.buckets:
            logits, state = self._prefill(self.params, state, jnp.int32(0), jnp.zeros((1, bucket), jnp.int32),
                                          jnp.int32(0), jnp.int32(bucket))
        _, state = self.insert(state, 0, 0, logits, row, jax.random.key(0), 1)
        outs, state = self.decode(state)
        state = self.set_allowed(state, {})
        state = self.release(state, 0)
        jax.block_until_ready(outs)
        return state


def make_row_request(vocab_size: int, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     min_p: float = 0.0, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
                     logit_bias: dict[int, float] | None = None, prompt: list[int] | None = None,
                     allowed: np.ndarray | None = None) -> RowRequest:
    bias = np.zeros(vocab_size, np.float32)
    for token, value in (logit_bias or {}).items():
        bias[int(token)] = value
    seen = np.zeros(vocab_size, bool)
    if prompt:
        seen[np.asarray(prompt)] = True
    if allowed is None:
        allowed = np.full(bitmask_words(vocab_size), 0xFFFFFFFF, np.uint32)
    return RowRequest(
        temperature=jnp.float32(temperature), top_p=jnp.float32(top_p), top_k=jnp.int32(top_k),
        min_p=jnp.float32(min_p), presence=jnp.float32(presence), frequency=jnp.float32(frequency),
        repetition=jnp.float32(repetition), bias=jnp.asarray(bias), seen=jnp.asarray(seen),
        allowed=jnp.asarray(allowed),
    )

