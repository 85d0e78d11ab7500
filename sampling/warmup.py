"""Warming up the device steps before serving: every program compiled once, so a server never compiles
while it serves (the engine counts traces to prove it), and the check whether decoded keys and values equal
prefill's (``sampling/kv_agreement.py``), which decides whether finished replies join the prefix cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from flaxchat.sampling.kv_agreement import decode_matches_prefill
from flaxchat.sampling.sampler import make_row_request

if TYPE_CHECKING:
    from flaxchat.sampling.steps import DecodeState, EngineSteps


def drop_staging_caches() -> None:
    """Forget how JAX traced and lowered the programs compiled so far, keeping the compiled programs
    themselves (a call with the same argument types runs them without tracing again).

    Measured on the default model (decode programs at 16, 8, 4 and 2 rows): each whole-model program left
    ~10 MB of tracing and lowering data and ~20 MB of executable resident, and dropping the former (JAX's
    staging caches, ``jax._src.util.clear_all_caches``; ``jax.clear_caches`` would drop the executables
    too) freed 47 MB of the 4 programs' ~125 while the next calls still ran without tracing. Done between
    the warm-up's compilations, the next compilation reuses that memory, so the server's peak does not
    grow with every program. A private JAX function: where it is missing, nothing is dropped.
    """
    try:
        from jax._src import util
    except ImportError:  # pragma: no cover - a JAX without the module
        return
    clear = getattr(util, "clear_all_caches", None)
    if clear is not None:
        clear()


def warm_up(steps: "EngineSteps", progress: bool = False, compile_all: bool = True) -> tuple[bool, "DecodeState"]:
    """Run every prefill bucket, batched prefill shape, score, insert, copy, block move, decode bucket and
    variant, mask upload and release once, then the KV agreement check; returns its answer and the state.
    ``progress``: a bar of the steps compiled so far on stderr. ``compile_all=False``: only the check,
    every other step compiles on first use (a one-off answer, most tests)."""
    if not compile_all:
        return decode_matches_prefill(steps, steps.init_state())
    from tqdm import tqdm

    decode_calls = [(count, bucket) for count in steps.step_counts for bucket in steps.row_buckets]
    one_off = 8  # score, insert, copy, save and load blocks; set masks, release; the KV agreement check
    bar = tqdm(total=len(steps.buckets) + len(steps.batch_shapes) + len(decode_calls) + one_off,
               desc="warm-up: compiling steps", unit="step", disable=not progress)

    def compiled(count: int = 1) -> None:
        bar.update(count)
        drop_staging_caches()

    state = steps.init_state()
    for bucket in steps.buckets:
        logits, state = steps.prefill_chunk(state, 0, [0] * bucket, 0, bucket)
        compiled()
    for shape in steps.batch_shapes:
        _, state = steps.prefill_batch(state, [(0, [0] * shape[1], 0)], shape)
        compiled()
    _, _, state = steps.score_chunk(state, 0, [0], 0)
    _, state = steps.insert(state, 0, logits, make_row_request(steps.cfg.vocab_size, temperature=1.0),
                            jax.random.key(0), 1)
    state = steps.copy_slot(state, 0, 0)
    state = steps.save_blocks(state, 0, 0, [0])
    state = steps.load_blocks(state, 1 % steps.slots, [0])
    compiled(5)
    for count, bucket in decode_calls:
        outs, state = steps.decode(state, [0], count, bucket)
        compiled()
    state = steps.set_allowed(state, {})
    state = steps.release(state, 0)
    compiled(2)
    extends, state = decode_matches_prefill(steps, state)
    bar.update()
    bar.close()
    jax.block_until_ready(outs)
    return extends, state
