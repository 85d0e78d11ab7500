"""Prefix reuse and chunked prefill keep the seed contract; the index evicts least-recently-used blocks.

A reply must not depend on whether its prompt's KV came from the prefix cache, how the prompt was cut into
chunks, or what else the engine was doing: checked here on the prefill step alone (every chunk size at odd
alignments against one whole-prompt chunk) and through the engine (cold, warm, partly matching, under load,
with a tiny cache that evicts), for both weight modes.
"""

import time

import jax
import numpy as np
import pytest

from flaxchat.sampling.engine import Engine, EngineConfig
from flaxchat.sampling.params import SamplingParams
from flaxchat.sampling.prefix_cache import PrefixIndex
from flaxchat.sampling.steps import EngineSteps
from tests.engine_fixtures import tiny_model, with_weights
from tests.step_hooks import set_step_hook

BLOCK = 16
MAX_LEN = 256


# ---- the index ---------------------------------------------------------------------------------------
def _chain(index, tokens):
    """Add every full block of ``tokens`` as the engine does; returns the pool blocks written."""
    parent, written = PrefixIndex.ROOT, []
    for block in index.blocks_of(tokens):
        added = index.add(parent, block)
        if added is None:
            break
        parent, pool_block, is_new = added
        if is_new:
            written.append(pool_block)
    index.touch_chain(tokens, len(index.blocks_of(tokens)))
    return written


def test_index_matches_the_longest_cached_run_of_full_blocks():
    index = PrefixIndex(block_size=4, capacity=10)
    assert _chain(index, list(range(10))) == [0, 1]  # two full blocks; the last 2 tokens are not a block
    assert index.match(list(range(12)), 3).tokens == 8
    assert index.match(list(range(12)), 1).blocks == (0,)  # capped by max_blocks
    assert index.match([0, 1, 2, 3, 4, 5, 6, 99], 3).blocks == (0,)  # second block differs
    assert index.match([9, 1, 2, 3, 4, 5, 6, 7], 3).blocks == ()  # a block is keyed by its whole prefix
    assert _chain(index, list(range(8)) + [50, 51, 52, 53]) == [2]  # shares two blocks, adds one
    assert index.used_blocks == 3


def test_a_tail_continues_a_chain_and_is_evicted_like_a_leaf():
    index = PrefixIndex(block_size=4, capacity=3)
    assert _chain(index, list(range(8))) == [0, 1]
    parent = index.match(list(range(8)), 2).keys[-1]
    assert index.add_tail(parent, (8, 9)) == (2, True)
    assert index.add_tail(parent, (8, 9)) == (2, False)  # already cached
    whole = list(range(12))
    found = index.match(whole, 2, tail_limit=11)
    assert (found.tokens, found.tail, found.pool_blocks) == (10, 2, (0, 1, 2))
    assert index.match(whole, 2, tail_limit=9).tail == 1  # the limit leaves room for one of its tokens
    assert index.match([0, 1, 2, 3, 4, 5, 6, 7, 8, 7], 2, tail_limit=9).tail == 1  # the prompt shares its first
    assert index.match([0, 1, 2, 3, 4, 5, 6, 7, 5, 9], 2, tail_limit=9).tail == 0  # nothing shared
    assert index.match(whole, 2).tail == 0  # no tail asked for
    with pytest.raises(ValueError):
        index.add_tail(parent, (1, 2, 3, 4))
    index.match(list(range(8)), 2)  # the chain is now more recent than the tail
    assert _chain(index, [50, 51, 52, 53]) == [2]  # the pool is full: the tail, least recently used, goes
    assert index.match(whole, 2, tail_limit=11).tokens == 8


def test_a_prompt_that_leaves_a_cached_block_midway_takes_its_shared_tokens():
    """Token-granular matches: the child (full block or tail) sharing the most first tokens gives them."""
    index = PrefixIndex(block_size=4, capacity=10)
    _chain(index, [1, 2, 3, 4, 5, 6, 7, 8])
    _chain(index, [1, 2, 3, 4, 5, 9, 9, 9])  # a sibling sharing one token of the second block
    parent = index.match([1, 2, 3, 4], 1).keys[-1]
    index.add_tail(parent, (5, 6, 0))
    found = index.match([1, 2, 3, 4, 5, 6, 7, 0, 3], 2, tail_limit=8)
    assert (found.blocks, found.tail, found.tokens) == ((0,), 3, 7)  # three of 5 6 7 8; not the tail's two
    assert found.pool_blocks == (0, 1)
    assert index.match([1, 2, 3, 4, 5, 9, 7], 2, tail_limit=6).tail == 2  # the sibling: 5 9
    assert index.match([1, 2, 3, 4, 5, 6, 0, 1], 2, tail_limit=7).tail == 3  # the tail: 5 6 0
    assert index.match([1, 2, 3, 4, 5, 6, 7, 8, 1], 1, tail_limit=5).tail == 1  # capped by the limit
    assert index.match([1, 2, 3, 4, 8, 6, 7, 8], 2, tail_limit=7).tail == 0  # no child starts with 8
    assert index.match([1, 2, 3, 9], 1, tail_limit=3).tokens == 3  # a first block shared in part
    _chain(index, list(range(20, 60)))  # ten new blocks evict every other one: evicted children are forgotten
    assert index.evictions == 4
    for probe in ([1, 2, 3, 4, 5, 6, 7, 0, 3], [1, 2, 3, 9]):
        assert index.match(probe, 2, tail_limit=len(probe) - 1).tokens == 0
    assert index.match(list(range(20, 27)), 1, tail_limit=6).tokens == 6


def test_index_evicts_least_recently_used_leaves_first():
    index = PrefixIndex(block_size=2, capacity=4)
    a, b = [1, 1, 2, 2, 3, 3], [7, 7, 8, 8]
    _chain(index, a)  # 3 blocks
    _chain(index, b)  # needs 2: evicts one of a's; a's leaf goes first, so a keeps its first two
    assert index.evictions == 1
    assert index.match(a, 3).tokens == 4
    assert index.match(b, 2).tokens == 4
    index.match(b, 2)
    _chain(index, [5, 5])  # evicts the least recently used: a's leaf-most remaining block
    assert index.match(a, 3).tokens == 2 and index.match(b, 2).tokens == 4


def test_index_with_no_capacity_caches_nothing():
    index = PrefixIndex(block_size=2, capacity=0)
    assert _chain(index, [1, 2, 3, 4]) == []
    assert index.match([1, 2, 3, 4], 2).blocks == ()


# ---- the prefill step --------------------------------------------------------------------------------
# The default model's widths (few layers, tiny vocabulary): XLA:CPU picks its matmul kernel by shape, and the
# float32 kernel switch that sets the smallest exact prefill chunk (64 rows) does not happen at toy widths.
REAL_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   num_hidden_layers=2)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("prefix"), context=MAX_LEN, shape=REAL_WIDTHS)


def _cache_rows(state, slot, length):
    """Every stored array of ``slot``'s first ``length`` positions (keys, values and any int8 scales)."""
    return [np.asarray(leaf[:, slot, :, :length]) for leaf in jax.tree.leaves(state.cache)]


@pytest.mark.parametrize("weights,kv_dtype,prompt_activations", [
    ("int8", None, "float32"), ("float32", None, "float32"), ("int4", "int8", "float32"), ("int4", "int8", "int8")])
def test_prefill_rows_are_identical_for_every_chunk_size_and_alignment(float_model, weights, kv_dtype,
                                                                        prompt_activations):
    """A prompt prefilled in one chunk, and the same prompt cut at odd places into chunks of every bucket
    the engine uses: every layer's cache rows and the last token's logits must be bit-identical. This is
    what makes cached blocks interchangeable with freshly computed ones."""
    cfg, params, _ = with_weights(float_model, weights)
    cfg = cfg.replace(prompt_activations=prompt_activations)
    steps = EngineSteps(cfg, params, 16, MAX_LEN, largest_bucket=MAX_LEN, kv_dtype=kv_dtype)  # 16: every batch shape
    prompt = np.random.default_rng(1).integers(3, cfg.vocab_size, 200).tolist()
    state = steps.init_state()
    reference, state = steps.prefill(state, 0, prompt)
    reference_rows = _cache_rows(state, 0, len(prompt))
    for bucket in steps.buckets:
        for offset in (0, 7, 37):
            start, cuts = 0, []
            while start < len(prompt):
                size = bucket - offset if start == 0 and offset < bucket else bucket
                cuts.append((start, size))
                start += size
            for start, size in cuts:
                logits, state = steps.prefill_chunk(state, 1, prompt, start, size)
            rows = _cache_rows(state, 1, len(prompt))
            assert all(np.array_equal(a, b) for a, b in zip(reference_rows, rows)), (bucket, offset)
            assert np.array_equal(np.asarray(logits), np.asarray(reference)), (bucket, offset)
    # The prompt's last tokens in a batched call (with another prompt beside it): same rows, same logits.
    other = np.random.default_rng(2).integers(3, cfg.vocab_size, 150).tolist()
    assert steps.batch_shapes
    for shape in steps.batch_shapes:
        start, other_start = len(prompt) - shape[1] + (3 if shape[1] > 3 else 0), len(other) - shape[1]
        _, state = steps.prefill(state, 1, prompt[:start])
        _, state = steps.prefill(state, 0, other[:other_start])
        (logits, _), state = steps.prefill_batch(state, [(1, prompt, start), (0, other, other_start)], shape)
        rows = _cache_rows(state, 1, len(prompt))
        assert all(np.array_equal(a, b) for a, b in zip(reference_rows, rows)), shape
        assert np.array_equal(np.asarray(logits), np.asarray(reference)), shape
    if prompt_activations == "int8":  # the integer path ran: float activations give other bits
        float_steps = EngineSteps(cfg.replace(prompt_activations="float32"), params, 2, MAX_LEN, kv_dtype=kv_dtype)
        float_logits, _ = float_steps.prefill(float_steps.init_state(), 0, prompt)
        assert not np.array_equal(np.asarray(float_logits), np.asarray(reference))


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_pool_blocks_round_trip(float_model, kv_dtype):
    """save_blocks then load_blocks into another slot reproduces the cache rows exactly (with their int8
    scales)."""
    cfg, params, _ = with_weights(float_model, "float32")
    steps = EngineSteps(cfg, params, 2, MAX_LEN, kv_dtype=kv_dtype, pool_blocks=8, block_size=BLOCK)
    prompt = np.random.default_rng(2).integers(3, cfg.vocab_size, 3 * BLOCK).tolist()
    state = steps.init_state()
    _, state = steps.prefill(state, 0, prompt)
    state = steps.save_blocks(state, 0, 0, [5, 2, 7])
    state = steps.load_blocks(state, 1, [5, 2, 7])
    assert len(jax.tree.leaves(state.cache)) == (4 if kv_dtype == "int8" else 2)
    for a, b in zip(_cache_rows(state, 0, 3 * BLOCK), _cache_rows(state, 1, 3 * BLOCK)):
        assert np.array_equal(a, b) and np.any(a)


# ---- through the engine ------------------------------------------------------------------------------
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True, logprobs=True,
                        top_logprobs=3)


def _engine(float_model, weights, prompt_activations="float32", **config):
    cfg, params, tokenizer = with_weights(float_model, weights)
    cfg = cfg.replace(prompt_activations=prompt_activations)
    defaults = dict(slots=4, max_len=MAX_LEN, prefill_chunk=32, largest_prefill_bucket=64, prefix_block=BLOCK,
                    warmup=False)  # steps compile on first use: only the shapes a test runs
    return Engine(cfg, params, tokenizer, EngineConfig(**{**defaults, **config})).start()


@pytest.fixture(scope="module")
def engines(float_model):
    """``engines(weights, cached)``: one engine per (weight mode, prefix cache on/off), started on first use
    and shared by the tests of this module."""
    started = {}

    def get(weights, cached=True, kv_dtype=None, prompt_activations="float32"):
        key = (weights, cached, kv_dtype, prompt_activations)
        if key not in started:
            warmup = key == ("float32", True, None, "float32")  # test_no_compiles_after_warmup_with_prefix_reuse
            started[key] = _engine(float_model, weights, prompt_activations, kv_dtype=kv_dtype, warmup=warmup,
                                   **({} if cached else {"prefix_cache_mb": 0}))
        return started[key]

    yield get
    for engine in started.values():
        engine.stop()


def _reply(engine, prompt, params=SEEDED):
    handle = engine.submit(prompt, params)
    events = handle.result()[0]
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None], handle.cached_tokens


@pytest.mark.parametrize("weights,kv_dtype,prompt_activations", [
    ("int8", None, "float32"), ("float32", None, "float32"), ("int4", "int8", "float32"), ("int4", "int8", "int8")])
def test_a_seeded_reply_is_the_same_cold_warm_partly_cached_and_under_load(engines, weights, kv_dtype,
                                                                          prompt_activations):
    rng = np.random.default_rng(3)
    system = rng.integers(3, 200, 90).tolist()  # a shared "system prompt" of 5 full blocks and a bit
    prompt = system + rng.integers(3, 200, 30).tolist()
    sibling = system + rng.integers(3, 200, 41).tolist()  # same system prompt, other question

    reference, cached = _reply(engines(weights, cached=False, kv_dtype=kv_dtype,
                                       prompt_activations=prompt_activations), prompt)
    assert cached == 0 and len(reference) == 12

    engine = engines(weights, kv_dtype=kv_dtype, prompt_activations=prompt_activations)
    engine.prefix.clear()  # (the engine is idle between these requests)
    cold, cached = _reply(engine, prompt)
    assert cold == reference and cached == 0
    warm, cached = _reply(engine, prompt)
    assert warm == reference and cached == len(prompt) - 1  # all of it but the last token (its tail, in part)
    engine.prefix.clear()
    _reply(engine, sibling)  # only the shared system prompt's blocks (and the sibling's) are cached now
    partly, cached = _reply(engine, prompt)  # leaves the sibling's sixth block after its 10th token
    assert partly == reference and cached == len(system)

    # Under load: long prompts prefilling in chunks and other streams decoding around it.
    noise = [rng.integers(3, 200, n).tolist() for n in (150, 70, 130)]
    others = [engine.submit(p, SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True))
              for i, p in enumerate(noise)]
    loaded = engine.submit(prompt, SEEDED)
    for handle in others:
        handle.result()
    got = [(e.token_id, e.logprob, e.top_logprobs) for e in loaded.result()[0] if e.token_id is not None]
    assert got == reference


def test_a_tiny_cache_evicts_and_stays_correct(float_model):
    """A pool of 3 blocks: prompts keep evicting each other's blocks; replies never change."""
    block_bytes = EngineSteps.pool_block_bytes(float_model[0], float_model[0].dtype, BLOCK)
    engine = _engine(float_model, "float32", prefix_cache_mb=3.5 * block_bytes / 2**20)
    try:
        assert engine.prefix.capacity == 3
        rng = np.random.default_rng(4)
        prompts = [rng.integers(3, 200, 60).tolist() for _ in range(3)]
        first = [_reply(engine, p)[0] for p in prompts]
        again = [_reply(engine, p)[0] for p in reversed(prompts)]
        assert again == list(reversed(first))
        assert engine.prefix.evictions > 0 and engine.prefix.used_blocks <= 3
        assert engine.stats["prefix_hit_tokens"] > 0
    finally:
        engine.stop()


def test_live_streams_keep_decoding_while_a_long_prompt_is_prefilled(engines):
    """A long prompt arriving while a stream decodes is prefilled in chunks of at most ``prefill_chunk``
    tokens, with a decode call between every two chunks: the stream's inter-token gap is bounded by one
    chunk, not by the whole prompt."""
    engine = engines("float32", cached=False)
    assert engine.config.prefill_chunk == 32
    timeline = []
    try:
        stream = engine.submit([5, 6, 7], SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True))
        events = iter(stream)
        next(events)
        next(events)  # the stream is decoding
        set_step_hook(engine, timeline.append)  # called by the engine thread before every prefill chunk and decode call
        long_prompt = np.random.default_rng(5).integers(3, 200, 200).tolist()
        long_handle = engine.submit(long_prompt, SamplingParams(max_tokens=2, temperature=0.0))
        long_events = long_handle.result()[0]
        set_step_hook(engine, None)
        assert long_events[-1].finish_reason is not None
        rest = list(events)
        assert rest[-1].finish_reason == "length"
        chunks = [i for i, stage in enumerate(timeline) if stage == "prefill"]
        assert len(chunks) >= 200 // 32  # the long prompt went in several chunks...
        between = [timeline[a + 1:b].count("decode") for a, b in zip(chunks, chunks[1:])]
        assert all(count >= 1 for count in between), timeline  # ...each followed by a decode call
    finally:
        set_step_hook(engine, None)


def test_no_compiles_after_warmup_with_prefix_reuse(engines):
    engine = engines("float32")
    compiled = engine.compile_count
    rng = np.random.default_rng(6)
    base = rng.integers(3, 200, 100).tolist()
    for extra in (0, 5, 40, 100):
        _reply(engine, base + rng.integers(3, 200, extra).tolist(), SamplingParams(max_tokens=3, n=2, seed=1))
    assert engine.compile_count == compiled


@pytest.mark.parametrize("weights,rests,shape", [("int8", (5, 12, 20, 9), (4, 16)), ("float32", (5, 12, 20, 9), (4, 16)),
                                                  ("int8", (1, 3, 2, 4), (4, 4)), ("float32", (1, 3, 2, 4), (4, 16)),
                                                  ("int8", (1, 2, 1, 1), (4, 2)), ("int8", (8, 6, 7, 5), (4, 8))])
def test_short_rests_are_prefilled_together_with_the_same_replies(engines, weights, rests, shape):
    """Requests that share a cached system prompt queue up behind a long prompt; their short rests then go
    in one batched prefill call (of the smallest shape that keeps the bits: 4 x 4 rows are enough for the
    quantised kernel, float32 needs 64), and each seeded reply is bit-identical to its reply alone with no
    cache."""
    rng = np.random.default_rng(7)
    system = rng.integers(3, 200, 64).tolist()
    prompts = [system + rng.integers(3, 200, n).tolist() for n in rests]
    settings = [SamplingParams(max_tokens=6, temperature=0.8, seed=100 + i, logprobs=True) for i in range(4)]

    alone = [_reply(engines(weights, cached=False), p, s)[0] for p, s in zip(prompts, settings)]

    engine = engines(weights)
    batched_before = engine.stats["batched_prefills"]
    try:
        _reply(engine, system + [9, 9, 9])  # caches the system prompt's blocks
        slow_first = iter([True])
        set_step_hook(engine, lambda stage: next(slow_first, False) and time.sleep(0.3))
        long_prompt = rng.integers(3, 200, 180).tolist()
        blocker = engine.submit(long_prompt, SamplingParams(max_tokens=2))
        handles = [engine.submit(p, s) for p, s in zip(prompts, settings)]
        together = [[(e.token_id, e.logprob, e.top_logprobs) for e in h.result()[0] if e.token_id is not None]
                    for h in handles]
        blocker.result()
        assert engine.stats["batched_prefills"] > batched_before
        assert engine.stats[f"batched_prefills_{shape[0]}x{shape[1]}"] >= 1
        # the system prompt, and any first tokens of a rest an earlier case of this module cached
        assert all(64 <= h.cached_tokens < len(p) for h, p in zip(handles, prompts))
        assert together == alone
    finally:
        set_step_hook(engine, None)


@pytest.mark.parametrize("weights,kv_dtype", [("int8", None), ("int4", "int8"), ("float32", None)])
def test_a_next_turn_reuses_the_replys_blocks_and_keeps_its_bits(engines, weights, kv_dtype):
    """Where decoding writes the keys and values a prefill would (the quantised kernels, XLA without FMA
    contraction: measured at warm-up), a finished reply's full blocks join the prefix cache, so the next
    turn, which resends the reply, computes only its new tokens; its seeded reply is bit-identical to the
    same request on an engine without a prefix cache. Float32 weights (XLA's dot) do not qualify."""
    engine = engines(weights, kv_dtype=kv_dtype)
    assert engine.steps.decode_extends_prefix == (weights != "float32")
    rng = np.random.default_rng(11)
    prompt = rng.integers(3, 200, 37).tolist()
    first, _ = _reply(engine, prompt, SamplingParams(max_tokens=40, temperature=0.8, seed=5, ignore_eos=True))
    reply = [token for token, _, _ in first]
    following = prompt + reply + rng.integers(3, 200, 9).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=6, logprobs=True, top_logprobs=2)
    warm, cached = _reply(engine, following, params)
    cold, _ = _reply(engines(weights, cached=False, kv_dtype=kv_dtype), following, params)
    assert warm == cold
    in_slot = len(prompt) + len(reply) - 1  # the last sampled token's KV is never written
    assert cached == (in_slot if engine.steps.decode_extends_prefix else len(prompt))  # whole blocks and a tail


@pytest.mark.parametrize("bad", [dict(prefill_chunk=0), dict(prefix_block=0), dict(prefix_cache_mb=-1)])
def test_bad_prefill_settings_are_refused(float_model, bad):
    cfg, params, tokenizer = float_model
    with pytest.raises(ValueError):
        Engine(cfg, params, tokenizer, EngineConfig(**bad))
