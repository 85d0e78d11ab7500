"""What the engine asks of the device: the ``DeviceSteps`` protocol.

The engine (``sampling/engine.py``) is a scheduler over fixed slots; everything it does to device state goes
through these calls, as in JetStream's engine API (prefill / insert / generate / free), plus the prefix pool's
block copies. ``EngineSteps`` (``sampling/steps.py``) is the real, jitted implementation;
``tests/fake_steps.py`` is one in numpy whose tokens can be worked out by hand, so the scheduler is tested
without a model.

State is opaque to the engine: every call takes the state and returns the new one (the real steps donate
it). Logits from a prefill are only handed back to ``insert``. A decode or insert returns a
``SampleOutput``-shaped value: ``tokens``, ``logprobs`` ``[steps, rows]`` (``[1]`` for insert) and
``top_ids``, ``top_logprobs`` with a trailing axis of alternatives; ``jax.device_get`` turns it into numpy.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

State = Any
Logits = Any


class DeviceLost(RuntimeError):
    """The device can run no step again (a cluster's processes fell out of step): the engine stops, and the
    server says it needs a restart, instead of failing every request that follows."""


class DeviceSteps(Protocol):
    buckets: tuple[int, ...]  # prefill chunk sizes; the last is the most one call prefills
    pool_blocks: int  # prefix-pool blocks of block_size tokens
    block_size: int
    score_chunk_size: int  # prompt tokens per score_chunk call
    compiles: int  # traces so far (zero compiles after warm-up is an invariant)
    max_len: int  # cache positions per slot
    decode_extends_prefix: bool  # decoded tokens' KV equals prefill's: finished replies' blocks may be cached
    slot_order: tuple[int, ...]  # the order free slots are taken in (spread over data shards on a mesh)
    lost: str | None  # why no step can run any more (``DeviceLost``), or None

    @property
    def block_bytes(self) -> int:
        """Device bytes of one prefix-pool block."""

    def warmup(self, progress: bool = False, compile_all: bool = True) -> State:
        """A fresh state, with every shape the other calls use compiled (``compile_all=False``: each on first
        use)."""

    def init_state(self) -> State:
        """A fresh state (all slots free, the pool empty)."""

    def chunk_length(self, n: int) -> int:
        """How many of ``n`` remaining prompt tokens the next ``prefill_chunk`` should take."""

    def batch_plan(self, rests: list[int]) -> tuple[tuple[int, int], int] | None:
        """The batched prefill call for the queue's leading prompts, which have ``rests`` tokens to go:
        ``(shape, how many)``, or None when no batched call takes two or more (``sampling/shapes.py``)."""

    def row_bucket_for(self, n: int) -> int:
        """The decode row bucket that runs ``n`` live slots."""

    def prefill_chunk(self, state: State, slot: int, prompt: list[int], start: int,
                      size: int) -> tuple[Logits, State]:
        """Write ``prompt[start:start + size]`` into ``slot`` (which holds ``prompt[:start]``); the logits of
        the prompt's last token when the chunk holds it."""

    def score_chunk(self, state: State, slot: int, prompt: list[int], start: int) -> tuple[Any, Logits, State]:
        """``prefill_chunk`` of ``score_chunk_size`` tokens that also scores each one's next token
        (``sampling/scoring.py``): a ``ChunkScores``, the logits, the state."""

    def prefill_batch(self, state: State, parts: list[tuple[int, list[int], int]], shape: tuple[int, int]
                      ) -> tuple[tuple[Logits, ...], State]:
        """The rest of several prompts in one call of ``shape`` (from ``batch_plan``): ``(slot, prompt, start)``
        each; their last logits."""

    def load_blocks(self, state: State, slot: int, blocks: list[int]) -> State:
        """Fill ``slot``'s first ``len(blocks)`` blocks from the prefix pool."""

    def save_blocks(self, state: State, slot: int, first: int, blocks: list[int]) -> State:
        """Copy ``slot``'s blocks ``first, first + 1, ...`` into the pool blocks ``blocks``."""

    def copy_slot(self, state: State, dst: int, src: int) -> State:
        """``dst``'s cache becomes ``src``'s (the other choices of a prompt)."""

    def insert(self, state: State, slot: int, logits: Logits, row: Any, key: Any, prompt_len: int) -> tuple[Any, State]:
        """Start a choice in ``slot``: its settings ``row``, its PRNG ``key``; samples its first token."""

    def decode(self, state: State, slots: list[int], steps: int | None = None) -> tuple[Any, State]:
        """``steps`` decode steps of the live ``slots``; outputs ``[steps, bucket]``, column j is slots[j]."""

    def release(self, state: State, slot: int) -> State:
        """Free ``slot``."""

    def set_allowed(self, state: State, masks: dict[int, np.ndarray]) -> State:
        """Next-token bitmasks for some slots (guided choices)."""

    def close(self) -> None:
        """The engine stopped: nothing more will be asked (other processes replaying the calls may exit)."""

    def failed(self, error: Exception) -> None:
        """A call, or reading its results, raised ``error``: set ``lost`` if no step can run again."""
