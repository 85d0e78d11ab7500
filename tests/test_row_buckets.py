"""Decode row buckets keep a row's bits: the seed contract on the path that decodes only the live slots.

A decode call runs a bucket of rows (the live slots, padded), so a lone request runs in a small bucket and
the same request under load in a large one. That is only allowed where a row's result does not depend on
the bucket: these tests check every bucket size the engine uses (and sizes between them), on the model
step alone and through the engine, for both weight modes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.model.transformer import Transformer, init_cache
from flaxchat.sampling.engine import Engine, EngineConfig
from flaxchat.sampling.params import SamplingParams
from flaxchat.sampling.shapes import row_buckets, smallest_row_bucket
from tests.engine_fixtures import tiny_model, with_weights

SLOTS = 16
PROMPT_LEN = 12


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("buckets"))


@pytest.mark.parametrize("weights,kv_dtype", [("int8", None), ("int4", None), ("int4", "int8"), ("float32", None)])
def test_a_rows_logits_are_identical_in_every_bucket(float_model, weights, kv_dtype):
    """Fill 16 cache rows with different prompts, then decode one step with slot 5 in every bucket size the
    engine uses (and two sizes between them), with other live slots and padding rows around it: slot 5's
    logits must be bit-identical to its logits in the full 16-row step. (Every size 1..16 was checked
    once on the real model too: bench/RESULTS.md.)"""
    cfg, params, _ = with_weights(float_model, weights)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, size=(SLOTS, PROMPT_LEN)).astype(np.int32)
    cache = init_cache(cfg, SLOTS, 64, kv_dtype)
    positions = np.tile(np.arange(PROMPT_LEN, dtype=np.int32), (SLOTS, 1))
    _, cache = model.apply({"params": params}, jnp.asarray(prompts), jnp.asarray(positions), cache)
    next_tokens = rng.integers(3, cfg.vocab_size, size=SLOTS).astype(np.int32)

    @jax.jit
    def step(params, cache, rows, tokens):
        positions = jnp.full((rows.shape[0], 1), PROMPT_LEN, jnp.int32)
        logits, _ = model.apply({"params": params}, tokens[:, None], positions, cache, rows=rows)
        return logits[:, 0]

    target = 5
    full_rows = np.roll(np.arange(SLOTS, dtype=np.int32), 3)  # slot 5 is not in column 0 here
    full = np.asarray(step(params, cache, jnp.asarray(full_rows), jnp.asarray(next_tokens[full_rows])))
    reference = full[list(full_rows).index(target)]
    smallest = smallest_row_bucket(cfg)
    buckets = row_buckets(SLOTS, smallest)
    assert buckets[0] == smallest and buckets[-1] == SLOTS
    for size in sorted(set(buckets[:-1]) | {3, 11}):  # every bucket the engine uses, and two sizes between
        for live in sorted({1, size // 2, size}):  # a bucket with padding rows, half full, and full
            others = [s for s in rng.permutation(SLOTS) if s != target][: live - 1]
            rows = np.array([target, *others] + [SLOTS] * (size - live), np.int32)  # SLOTS = padding row
            tokens = next_tokens[np.minimum(rows, SLOTS - 1)]
            got = np.asarray(step(params, cache, jnp.asarray(rows), jnp.asarray(tokens)))[0]
            assert np.array_equal(got, reference), (
                f"{weights}: slot {target} in a {size}-row bucket ({live} live) differs by "
                f"{np.abs(got - reference).max()}")


def _engine(float_model, weights, slots, kv_dtype=None):
    cfg, params, tokenizer = with_weights(float_model, weights)
    return Engine(cfg, params, tokenizer, EngineConfig(slots=slots, max_len=128, kv_dtype=kv_dtype,
                                                                warmup=False)).start()


SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True, logprobs=True,
                        top_logprobs=3, frequency_penalty=0.3)
OTHER = SamplingParams(max_tokens=60, temperature=1.2, seed=3, ignore_eos=True)


def _tokens(events):
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None]


@pytest.mark.parametrize("weights,slots,kv_dtype", [("int8", 8, None), ("int4", 8, None), ("int4", 8, "int8"),
                                                    ("float32", 8, None)])
def test_a_seeded_request_is_identical_alone_and_in_every_bucket(float_model, weights, slots, kv_dtype):
    """The same seeded request alone (smallest bucket) and next to 1, 3, ... slots-1 others (every larger
    bucket): identical tokens and logprobs, and the engine really ran each bucket."""
    engine = _engine(float_model, weights, slots, kv_dtype)
    try:
        prompt = [5, 40, 300, 17, 17, 9]
        alone = _tokens(engine.submit(prompt, SEEDED).result()[0])
        assert len(alone) == SEEDED.max_tokens
        for bucket in engine.steps.row_buckets:
            before = engine.stats.get(f"decode_rows_{bucket}", 0)
            neighbours = [engine.submit([7 + i, 8, 9 + i] * 3, OTHER) for i in range(bucket - 1)]
            for handle in neighbours:  # the neighbours are decoding before the seeded request arrives
                next(iter(handle))
            together = _tokens(engine.submit(prompt, SEEDED).result()[0])
            for handle in neighbours:
                handle.result()
            assert together == alone, f"{weights}: the request changed in a {bucket}-row bucket"
            assert engine.stats.get(f"decode_rows_{bucket}", 0) > before
    finally:
        engine.stop()
