"""Device steps in numpy whose tokens can be worked out by hand, and a one-character-per-token tokenizer:
the engine's scheduler tested without a model (``sampling/device_steps.py`` is the protocol).

The fake "KV cache" of a slot is the list of token ids written at its positions, and a prefix-pool block
is a list of ids, so a wrong copy, load or save shows up (each call checks what the slot must hold). The
tokens: a choice's first token is ``first_token(prompt, seed, index)``, each next one the previous plus
one (mod the vocabulary). Hooks (``before[stage] = fn``) hold, slow or fail a call on the engine thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from flaxchat.model.config import ModelConfig
from flaxchat.model.tokenizer import SpecialTokens, Tokenizer
from flaxchat.sampling.params import MAX_TOP_LOGPROBS
from flaxchat.sampling.sampler import choice_key
from flaxchat.sampling.scoring import ChunkScores
from flaxchat.sampling.shapes import batch_plan

LETTERS = 'abcdefghijklmnopqrstuvwxyz0123456789 .,:"{}[]'  # token i is LETTERS[i] (JSON fits)
EOS = len(LETTERS)  # "<eos>", the stop token
VOCAB = EOS + 1


class LetterTokenizer(Tokenizer):
    """One character per token (``LETTERS``) plus ``<eos>``."""

    def __init__(self) -> None:
        self.special = SpecialTokens(eos_token="<eos>", eos_id=EOS, stop_ids=frozenset({EOS}))

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [LETTERS.index(c) for c in text if c in LETTERS]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return "".join(LETTERS[i] if i < EOS else ("" if skip_special_tokens else "<eos>") for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode()

    def token_to_id(self, token: str) -> int | None:
        return EOS if token == "<eos>" else (LETTERS.index(token) if len(token) == 1 and token in LETTERS else None)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset({EOS})


def fake_config(max_len: int = 64) -> ModelConfig:
    """A config the engine reads sizes from (no model is built from it)."""
    return ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=32, max_position_embeddings=max_len)


def _first(prompt: list[int], key: Any) -> int:
    key_sum = int(np.asarray(jax.random.key_data(key)).astype(np.uint64).sum())
    return (sum(prompt) + key_sum) % EOS  # never EOS itself


def first_token(prompt: list[int], seed: int, index: int) -> int:
    """Choice ``index``'s first token for ``prompt`` with ``seed`` (from the key the engine passes)."""
    return _first(prompt, choice_key(seed, index))


def expected_tokens(prompt: list[int], seed: int, index: int, count: int) -> list[int]:
    """The first ``count`` tokens of a choice: each one the previous plus one, wrapping at the vocabulary."""
    first = first_token(prompt, seed, index)
    return [(first + i) % VOCAB for i in range(count)]


@dataclass
class Output:
    """What insert and decode return (``SampleOutput``'s fields): logprob of token t is -t / 100."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @classmethod
    def of(cls, tokens: np.ndarray) -> "Output":
        tokens = np.asarray(tokens, np.int32)
        return cls(tokens, -tokens / 100.0, tokens[..., None], (-tokens / 100.0)[..., None])


@dataclass
class FakeState:
    cache: dict[int, list[int]] = field(default_factory=dict)  # slot -> ids at positions 0..
    pool: dict[int, list[int]] = field(default_factory=dict)  # block -> ids
    last: dict[int, int] = field(default_factory=dict)  # slot -> its last sampled token
    allowed: dict[int, np.ndarray] = field(default_factory=dict)


class FakeSteps:
    """``DeviceSteps`` in numpy; ``calls`` records (stage, detail) in order."""

    def __init__(self, slots: int = 4, buckets: tuple[int, ...] = (8, 32), pool_blocks: int = 16,
                 block_size: int = 4, batch_shapes: tuple[tuple[int, int], ...] = ((4, 4), (4, 8)),
                 decode_extends_prefix: bool = False, max_len: int = 64):
        self.slots, self.buckets, self.pool_blocks, self.block_size = slots, buckets, pool_blocks, block_size
        self.slot_order = tuple(range(slots))
        self.batch_shapes = batch_shapes
        self.score_chunk_size = 8
        self.compiles = 0
        self.decode_extends_prefix = decode_extends_prefix  # decode appends to the slot's cache as prefill would
        self.max_len = max_len
        self.calls: list[tuple[str, Any]] = []
        self.lost: str | None = None
        self.before: dict[str, Callable[[], Any]] = {}

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return 100

    def chunk_length(self, n: int) -> int:
        return min(n, self.buckets[-1])

    def batch_plan(self, rests: list[int]) -> tuple[tuple[int, int], int] | None:
        return batch_plan(self.batch_shapes, rests)

    def row_bucket_for(self, n: int) -> int:
        return next(b for b in (1, 2, 4, 8, 16, 32, 64) if b >= n)

    # ---- steps -----------------------------------------------------------------------------------
    def _enter(self, stage: str, detail: Any) -> None:
        self.calls.append((stage, detail))
        if stage in self.before:
            self.before[stage]()

    def warmup(self, progress: bool = False, compile_all: bool = True) -> FakeState:
        return FakeState()

    def init_state(self) -> FakeState:
        return FakeState()

    def _write(self, state: FakeState, slot: int, prompt: list[int], start: int, size: int) -> tuple | None:
        held = state.cache.get(slot, [])  # beyond `start` it may hold anything, as a real slot does
        assert held[:start] == prompt[:start] and len(held) >= start, \
            f"slot {slot} holds {held}, expected the prompt's first {start} tokens"
        state.cache[slot] = list(prompt[: start + size])
        return tuple(prompt) if start + size >= len(prompt) else None

    def prefill_chunk(self, state: FakeState, slot: int, prompt: list[int], start: int, size: int):
        size = min(size, self.buckets[-1])
        self._enter("prefill", (slot, start, size))
        return self._write(state, slot, prompt, start, size), state

    def score_chunk(self, state: FakeState, slot: int, prompt: list[int], start: int):
        """Writes ``score_chunk_size`` tokens like ``prefill_chunk``; the score of token t is -t / 10, each
        alternative token t + 1 at -(t + 1) / 10."""
        chunk = self.score_chunk_size
        size = min(chunk, len(prompt) - start)
        self._enter("score", (slot, start, size))
        following = np.zeros(chunk, np.int32)
        following[: len(prompt[start + 1:start + chunk + 1])] = prompt[start + 1:start + chunk + 1]
        alternatives = np.repeat((following + 1)[:, None], MAX_TOP_LOGPROBS, axis=1)
        scores = ChunkScores(-following / 10.0, alternatives, -alternatives / 10.0)
        return scores, self._write(state, slot, prompt, start, size), state

    def prefill_batch(self, state: FakeState, parts: list[tuple[int, list[int], int]], shape: tuple[int, int]):
        assert shape in self.batch_shapes and len(parts) <= shape[0]
        assert all(len(prompt) - start <= shape[1] for _, prompt, start in parts)
        self._enter("prefill_batch", [(slot, start, len(prompt) - start) for slot, prompt, start in parts])
        return tuple(self._write(state, slot, prompt, start, len(prompt) - start) for slot, prompt, start in parts), state

    def load_blocks(self, state: FakeState, slot: int, blocks: list[int]) -> FakeState:
        self._enter("load_blocks", (slot, list(blocks)))
        state.cache[slot] = [t for block in blocks for t in state.pool[block]]
        return state

    def save_blocks(self, state: FakeState, slot: int, first: int, blocks: list[int]) -> FakeState:
        self._enter("save_blocks", (slot, first, list(blocks)))
        size = self.block_size
        for i, block in enumerate(blocks):
            ids = state.cache[slot][(first + i) * size: (first + i + 1) * size]
            assert len(ids) == size or i == len(blocks) - 1, "only the last block saved may be partial (a tail)"
            state.pool[block] = ids
        return state

    def copy_slot(self, state: FakeState, dst: int, src: int) -> FakeState:
        self._enter("copy_slot", (dst, src))
        state.cache[dst] = list(state.cache[src])
        return state

    def insert(self, state: FakeState, slot: int, logits: tuple, row: Any, key: Any, prompt_len: int):
        self._enter("insert", slot)
        prompt = list(logits)
        assert state.cache[slot] == prompt and len(prompt) == prompt_len, f"slot {slot} does not hold the prompt"
        token = state.last[slot] = _first(prompt, key)
        return Output.of(np.array([token])), state

    def decode(self, state: FakeState, slots: list[int], steps: int | None = None):
        self._enter("decode", list(slots))
        steps = steps or 1
        tokens = np.zeros((steps, self.row_bucket_for(len(slots))), np.int32)
        for step in range(steps):
            for column, slot in enumerate(slots):
                assert slot in state.last, f"decode of free slot {slot}"
                state.cache[slot].append(state.last[slot])
                state.last[slot] = tokens[step, column] = (state.last[slot] + 1) % VOCAB
        return Output.of(tokens), state

    def release(self, state: FakeState, slot: int) -> FakeState:
        self._enter("release", slot)
        state.cache.pop(slot, None)
        state.last.pop(slot, None)
        state.allowed.pop(slot, None)
        return state

    def set_allowed(self, state: FakeState, masks: dict[int, np.ndarray]) -> FakeState:
        self._enter("set_allowed", sorted(masks))
        state.allowed.update(masks)
        return state

    def close(self) -> None:
        """Nothing to let go of."""

    def failed(self, error: Exception) -> None:
        """A failed fake step leaves the fake device usable."""
