"""Prompt scoring: the log-probability of each prompt token given the tokens before it.

Evaluation harnesses score text this way (legacy completions' ``echo`` with ``logprobs``; ``LLM.score``). A
scored prompt is prefilled in chunks of ``SCORE_CHUNK`` tokens by a program that also projects every position
onto the vocabulary; its cache rows are the ones any other prefill computes (a chunk of at least
``smallest_prefill_bucket`` rows keeps every row's bits), so the reply that follows is the same as without
scoring. The numbers are the model's own distribution (``log_softmax`` of the raw logits, no penalties or
temperature), as vLLM's ``prompt_logprobs`` are.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model import reductions
from flaxchat.sampling.params import MAX_TOP_LOGPROBS, PromptTokenScore, TokenLogprob

SCORE_CHUNK = 64  # prompt tokens per scoring call (>= every smallest_prefill_bucket: rows keep their bits)


@flax.struct.dataclass
class ChunkScores:
    """One scoring call's numbers: row ``i`` scores the chunk's token ``i + 1`` (the next one)."""

    logprobs: jax.Array  # f32 [SCORE_CHUNK] of the next token
    top_ids: jax.Array  # i32 [SCORE_CHUNK, MAX_TOP_LOGPROBS]
    top_logprobs: jax.Array  # f32 [SCORE_CHUNK, MAX_TOP_LOGPROBS]


def chunk_scores(logits: jax.Array, next_tokens: jax.Array) -> ChunkScores:
    """``logits`` ``[C, V]`` of C positions, ``next_tokens`` ``[C]`` the token that follows each."""
    logprobs = reductions.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs, next_tokens[:, None], axis=-1)[:, 0]
    return ChunkScores(chosen, top_ids.astype(jnp.int32), top_logprobs)


def prompt_token_scores(prompt: list[int], chunks: list[ChunkScores], alternatives: int) -> tuple[PromptTokenScore, ...]:
    """Each prompt token's score from the host copies of its chunks (in order, from position 0): the first
    token has none (nothing comes before it), token ``i`` is scored by row ``i - 1``."""
    logprobs = np.concatenate([np.asarray(c.logprobs) for c in chunks])
    top_ids = np.concatenate([np.asarray(c.top_ids) for c in chunks])
    top_lps = np.concatenate([np.asarray(c.top_logprobs) for c in chunks])
    scores = [PromptTokenScore(prompt[0], None)]
    for i in range(1, len(prompt)):
        top = tuple(TokenLogprob(int(t), float(lp)) for t, lp in zip(top_ids[i - 1, :alternatives],
                                                                       top_lps[i - 1, :alternatives]))
        scores.append(PromptTokenScore(prompt[i], float(logprobs[i - 1]), top))
    return tuple(scores)
