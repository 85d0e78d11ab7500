"""Turn one step's logits into tokens for every row: processors, then sampling with explicit keys.

Order: repetition penalty -> presence/frequency -> logit_bias -> allowed-token mask -> (logprobs are read
here) -> temperature -> top-k -> top-p -> min-p -> sample. Reported logprobs therefore come from the
distribution after penalties, bias and the constraint mask but before temperature and truncation, so they
describe the model's preference, not the sampler's settings.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model import reductions
from flaxchat.sampling import processors as P
from flaxchat.sampling.params import ALL_ALLOWED, MAX_TOP_LOGPROBS, bitmask_words


@flax.struct.dataclass
class RowSettings:
    """Per-row sampling settings and history, ``[B]`` or ``[B, V]`` arrays."""

    temperature: jax.Array  # f32 [B]
    top_p: jax.Array  # f32 [B]
    top_k: jax.Array  # i32 [B]
    min_p: jax.Array  # f32 [B]
    presence: jax.Array  # f32 [B]
    frequency: jax.Array  # f32 [B]
    repetition: jax.Array  # f32 [B]
    bias: jax.Array  # f32 [B, V]
    allowed: jax.Array  # u32 [B, ceil(V/32)]
    counts: jax.Array  # i32 [B, V] tokens generated so far
    seen: jax.Array  # bool [B, V] prompt + generated tokens
    top_logprobs: jax.Array  # i32 [B] alternatives the row reports per token (0: none)


@flax.struct.dataclass
class RowRequest:
    """One choice's settings for ``insert`` (scalars and ``[V]`` rows; host numpy values until the jitted
    insert takes them)."""

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
    top_logprobs: jax.Array  # i32 alternatives reported per token (0: none)


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # i32 [B]
    logprobs: jax.Array  # f32 [B] of the chosen tokens
    top_ids: jax.Array  # i32 [B, MAX_TOP_LOGPROBS]
    top_logprobs: jax.Array  # f32 [B, MAX_TOP_LOGPROBS]


def sample(logits: jax.Array, rows: RowSettings, keys: jax.Array) -> SampleOutput:
    """Process and sample ``logits`` ``[B, V]`` (float32) with one typed PRNG key per row."""
    # Penalties and the constraint mask are passes over every row's vocabulary that leave a row with neutral
    # settings bit for bit as it was: they run only when some row needs them.
    penalised = (rows.repetition != 1) | (rows.presence != 0) | (rows.frequency != 0)
    logits = jax.lax.cond(
        jnp.any(penalised),
        lambda x: P.apply_presence_frequency(P.apply_repetition_penalty(x, rows.seen, rows.repetition),
                                             rows.counts, rows.presence, rows.frequency),
        lambda x: x, logits)
    logits = logits + rows.bias
    logits = jax.lax.cond(jnp.any(rows.allowed != jnp.uint32(ALL_ALLOWED)),
                          lambda x: P.apply_allowed_bitmask(x, rows.allowed), lambda x: x, logits)
    logprobs = reductions.log_softmax(logits, axis=-1)

    warped = P.apply_temperature(logits, rows.temperature)
    warped = P.top_k_mask(warped, rows.top_k)
    warped = P.top_p_mask(warped, rows.top_p)
    warped = P.min_p_mask(warped, rows.min_p)
    # Each rule runs only when some row needs it (an argmax over the vocabulary alone costs ~0.15 ms at one
    # row, ~0.6 ms at 16): a row's token is the same whichever other rows made the other rule run.
    no_tokens = lambda *_: jnp.zeros(logits.shape[0], jnp.int32)  # noqa: E731
    sampled = jax.lax.cond(jnp.any(rows.temperature > 0),
                           lambda k, w: P.categorical(k, w).astype(jnp.int32), no_tokens, keys, warped)
    greedy = jax.lax.cond(jnp.any(rows.temperature <= 0),
                          lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), no_tokens, logits)
    tokens = jnp.where(rows.temperature > 0, sampled, greedy)

    # The top alternatives cost a pass over every row's vocabulary (~2 ms at 16 rows): only when a row
    # reports them. Rows that do not get zeros, which nobody reads.
    top_logprobs, top_ids = jax.lax.cond(
        jnp.any(rows.top_logprobs > 0),
        lambda lp: tuple(jax.lax.top_k(lp, MAX_TOP_LOGPROBS)),
        lambda lp: (jnp.zeros((lp.shape[0], MAX_TOP_LOGPROBS), lp.dtype),
                    jnp.zeros((lp.shape[0], MAX_TOP_LOGPROBS), jnp.int32)),
        logprobs)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


def record_tokens(rows: RowSettings, tokens: jax.Array, active: jax.Array) -> RowSettings:
    """Add each active row's new token to its counts and seen set."""
    batch = jnp.arange(tokens.shape[0])
    counts = rows.counts.at[batch, tokens].add(active.astype(jnp.int32))
    seen = rows.seen.at[batch, tokens].set(rows.seen[batch, tokens] | active)
    return rows.replace(counts=counts, seen=seen)


def request_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)`` for the full unsigned 64-bit range.

    With 32-bit JAX, ``jax.random.key`` keeps only the low 32 bits of a seed; packing both halves as
    threefry's seeding does with x64 on keeps distinct 64-bit seeds distinct, and equals ``key(seed)``
    for seeds below 2**32.
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError("seed must be in [0, 2**64)")
    return jax.random.wrap_key_data(jnp.array([seed >> 32, seed & 0xFFFFFFFF], dtype=jnp.uint32))


def choice_key(seed: int, choice: int) -> jax.Array:
    """Key of choice ``choice`` of a request; token ``t`` then uses ``fold_in(choice_key, t)``.

    ``fold_in(request_key(seed), choice)`` as one jitted call (integer ops: the same bits as eager ones,
    in one dispatch instead of three, per choice started)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError("seed must be in [0, 2**64)")
    return _fold_choice(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32), np.uint32(choice))


@jax.jit
def _fold_choice(seed_words: jax.Array, choice: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(seed_words), choice)


def make_row_request(vocab_size: int, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     min_p: float = 0.0, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
                     logit_bias: dict[int, float] | None = None, prompt: list[int] | None = None,
                     allowed: np.ndarray | None = None, top_logprobs: int = 0) -> RowRequest:
    bias = np.zeros(vocab_size, np.float32)
    for token, value in (logit_bias or {}).items():
        bias[int(token)] = value
    seen = np.zeros(vocab_size, bool)
    if prompt:
        seen[np.asarray(prompt)] = True
    if allowed is None:
        allowed = np.full(bitmask_words(vocab_size), ALL_ALLOWED, np.uint32)
    # Host (numpy) values: the jitted insert takes them as they are, where each jnp scalar here would be an
    # eager device op of its own (~0.1 ms each, per request).
    return RowRequest(
        temperature=np.float32(temperature), top_p=np.float32(top_p), top_k=np.int32(top_k),
        min_p=np.float32(min_p), presence=np.float32(presence), frequency=np.float32(frequency),
        repetition=np.float32(repetition), bias=bias, seen=seen, allowed=np.asarray(allowed, np.uint32),
        top_logprobs=np.int32(top_logprobs),
    )

