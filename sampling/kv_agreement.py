"""Whether the keys and values a decode step writes are bit for bit the ones a prefill of the same tokens
writes: then a finished reply's blocks can join the prefix cache, and a chat's next turn, which resends
the reply, computes only its new message.

Measured, not assumed: a position's keys and values depend on the attention and the products of every
layer below it, and both kinds of call must compute them alike. The attention kernel runs decode steps
and prompt chunks by one arithmetic; the quantised product computes each row on its own; XLA's own
element-wise code has no FMA contraction (``flaxchat/__init__.py``). Float32 weights multiplied by XLA's
dot on CPU round differently for a decode bucket's few rows than for a prompt chunk's many, and other
backends promise nothing, so ``EngineSteps.warmup`` runs this check once and the engine saves decoded
blocks only where it passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from flaxchat.sampling.sampler import make_row_request

if TYPE_CHECKING:
    from flaxchat.sampling.steps import DecodeState, EngineSteps


def decode_matches_prefill(steps: "EngineSteps", state: "DecodeState") -> tuple[bool, "DecodeState"]:
    """Prefill a short prompt into slot 0, sample a token and decode one step (which writes the keys and
    values of position ``n``, the sampled token's), then prefill the prompt and that token from scratch:
    are position ``n``'s keys and values, every layer's, the same both times? Returns the answer and the
    state (slot 0 released)."""
    n = min(steps.buckets[0], steps.max_len - 2)
    prompt = [3 + (i * 7919) % (steps.cfg.vocab_size - 3) for i in range(n)]
    logits, state = steps.prefill(state, 0, prompt)
    out, state = steps.insert(state, 0, logits, make_row_request(steps.cfg.vocab_size, temperature=0.0),
                              jax.random.key(0), n)
    _, state = steps.decode(state, [0], 1)
    decoded = _position(steps, state, n)
    _, state = steps.prefill(state, 0, prompt + [int(jax.device_get(out.tokens)[0])])
    prefilled = _position(steps, state, n)
    return all(np.array_equal(a, b) for a, b in zip(decoded, prefilled)), steps.release(state, 0)


def _position(steps: "EngineSteps", state: "DecodeState", position: int) -> list[np.ndarray]:
    """Slot 0's stored keys and values (and int8 scales) at ``position``, every layer's, on the host."""
    return [np.asarray(leaf) for leaf in steps.placement.readable(
        [leaf[:, 0, :, position] for leaf in jax.tree.leaves(state.cache)])]
