"""The engine's scheduling on fake device steps (``tests/fake_steps.py``): no model, tokens known in advance.

Admission order, ``n`` choices, stop and budget, cancellation wherever a request is, a full queue, failed
prefill and decode calls, prefix reuse and chunked prefill beside live streams.
"""

from __future__ import annotations

import threading
import time

import pytest

from flaxchat.sampling.engine import Engine, EngineConfig
from flaxchat.sampling.params import SamplingParams
from flaxchat.sampling.requests import EngineStoppedError, QueueFullError, collect_text
from flaxchat.sampling.shapes import SKIPPED_PADDING_COST, batch_plan, batch_shapes
from tests.fake_steps import EOS, FakeSteps, LetterTokenizer, expected_tokens, fake_config, first_token

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def engine_on(steps: FakeSteps, **config) -> Engine:
    settings = {"slots": steps.slots, "max_len": 64, **config}
    return Engine(fake_config(64), None, LetterTokenizer(), EngineConfig(**settings), steps=steps).start()


@pytest.fixture
def steps():
    return FakeSteps()


@pytest.fixture
def engine(steps):
    engine = engine_on(steps)
    yield engine
    engine.stop()


def replies(handle) -> list[list]:
    """Each choice's events, in choice order (waits for the request to end)."""
    grouped = handle.result()
    return [grouped[i] for i in sorted(grouped)]


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def held(steps: FakeSteps, stage: str) -> threading.Event:
    """Make every ``stage`` call wait until the returned event is set."""
    release = threading.Event()
    steps.before[stage] = lambda: release.wait(10)
    return release


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def test_tokens_follow_the_steps_and_stop_at_the_budget(engine):
    (events,) = replies(engine.submit(PROMPT, SamplingParams(max_tokens=5, seed=3, ignore_eos=True)))
    assert tokens(events) == expected_tokens(PROMPT, 3, 0, 5)
    assert events[-1].finish_reason == "length" and [e.finish_reason for e in events[:-1]] == [None] * 4
    assert collect_text(events) == LetterTokenizer().decode(expected_tokens(PROMPT, 3, 0, 5), skip_special_tokens=True)
    assert engine.busy_slots == 0


def test_n_choices_share_one_prefill_and_each_follows_its_own_key(engine, steps):
    choices = replies(engine.submit(PROMPT, SamplingParams(n=3, max_tokens=4, seed=11, ignore_eos=True)))
    assert [tokens(c) for c in choices] == [expected_tokens(PROMPT, 11, i, 4) for i in range(3)]
    stages = [stage for stage, _ in steps.calls]
    assert stages.count("prefill") == 1 and stages.count("copy_slot") == 2 and stages.count("insert") == 3


def test_the_stop_token_ends_a_choice_without_text(engine):
    prompt = next([k] for k in range(EOS) if first_token([k], 5, 0) == EOS - 2)  # tokens: EOS-2, EOS-1, EOS
    (events,) = replies(engine.submit(prompt, SamplingParams(max_tokens=10, seed=5)))
    assert tokens(events) == [EOS - 2, EOS - 1, EOS] and events[-1].finish_reason == "stop"
    assert collect_text(events) == LetterTokenizer().decode([EOS - 2, EOS - 1])


def test_requests_are_admitted_first_come_first_served(engine, steps):
    release = held(steps, "decode")
    first = engine.submit(PROMPT, SamplingParams(n=4, max_tokens=2, seed=1, ignore_eos=True))  # every slot
    wait_until(lambda: any(stage == "decode" for stage, _ in steps.calls))
    a = engine.submit([7] * 5, SamplingParams(n=3, max_tokens=2, seed=2, ignore_eos=True))
    b = engine.submit([8] * 6, SamplingParams(max_tokens=2, seed=3, ignore_eos=True))
    time.sleep(0.05)
    assert engine.queue_depth == 2  # both wait for slots
    release.set()
    for handle in (first, a, b):
        replies(handle)
    prefills = [detail for stage, detail in steps.calls if stage.startswith("prefill")]
    assert [p for p in prefills if p != prefills[0]] in ([[(0, 0, 5), (3, 0, 6)]], [(0, 0, 5), (3, 0, 6)])


def test_cancel_wherever_the_request_is(engine, steps):
    release = held(steps, "decode")
    decoding = engine.submit(PROMPT, SamplingParams(n=4, max_tokens=50, seed=1, ignore_eos=True))
    wait_until(lambda: any(stage == "decode" for stage, _ in steps.calls))
    waiting = engine.submit(PROMPT, SamplingParams(max_tokens=5, seed=2))
    waiting.cancel()
    decoding.cancel()
    release.set()
    assert all(c[-1].finish_reason == "cancelled" for c in replies(decoding))
    assert replies(waiting)[0][-1].finish_reason == "cancelled"
    wait_until(lambda: engine.busy_slots == 0)
    assert sorted(detail for stage, detail in steps.calls if stage == "release") == [0, 1, 2, 3]
    (events,) = replies(engine.submit(PROMPT, SamplingParams(max_tokens=3, seed=4, ignore_eos=True)))
    assert tokens(events) == expected_tokens(PROMPT, 4, 0, 3)


def test_a_full_queue_refuses_and_the_queue_drains(steps):
    engine = engine_on(steps, queue_size=1)
    try:
        release = held(steps, "decode")
        busy = engine.submit(PROMPT, SamplingParams(n=4, max_tokens=2, ignore_eos=True))
        wait_until(lambda: any(stage == "decode" for stage, _ in steps.calls))
        queued = engine.submit(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True))
        with pytest.raises(QueueFullError):
            engine.submit(PROMPT, SamplingParams(max_tokens=2))
        release.set()
        assert replies(busy) and len(tokens(replies(queued)[0])) == 2
    finally:
        engine.stop()


def test_draining_ends_the_waiting_refuses_new_ones_and_lets_the_started_finish(steps):
    """What SIGTERM does (``Engine.drain``): requests waiting for a slot end at once as cancelled (a 503 with
    Retry-After to their clients), new ones are refused, and the decoding ones run to their budget."""
    engine = engine_on(steps)
    try:
        release = held(steps, "decode")
        started = engine.submit(PROMPT, SamplingParams(n=steps.slots, max_tokens=4, ignore_eos=True, seed=1))
        wait_until(lambda: any(stage == "decode" for stage, _ in steps.calls))
        waiting = [engine.submit(PROMPT, SamplingParams(max_tokens=4)) for _ in range(3)]
        engine.drain()
        for handle in waiting:
            (events,) = replies(handle)
            assert [e.finish_reason for e in events] == ["cancelled"] and tokens(events) == []
        with pytest.raises(EngineStoppedError):
            engine.submit(PROMPT, SamplingParams(max_tokens=4))
        release.set()
        for index, events in enumerate(replies(started)):
            assert tokens(events) == expected_tokens(PROMPT, 1, index, 4) and events[-1].finish_reason == "length"
        assert engine.busy_slots == 0 and engine.healthy
    finally:
        engine.stop()


def test_a_failed_decode_call_ends_its_choices_and_the_engine_goes_on(engine, steps):
    failures = iter([RuntimeError("device lost")])

    def fail_once():
        error = next(failures, None)
        if error is not None:
            raise error

    steps.before["decode"] = fail_once
    (events,) = replies(engine.submit(PROMPT, SamplingParams(max_tokens=5, seed=1)))
    assert events[-1].finish_reason == "error" and "device lost" in events[-1].error
    (events,) = replies(engine.submit(PROMPT, SamplingParams(max_tokens=3, seed=2, ignore_eos=True)))
    assert tokens(events) == expected_tokens(PROMPT, 2, 0, 3)
    wait_until(lambda: engine.busy_slots == 0)


def test_a_failed_prefill_ends_only_its_request(engine, steps):
    release = held(steps, "decode")
    running = engine.submit(PROMPT, SamplingParams(max_tokens=6, seed=1, ignore_eos=True))
    wait_until(lambda: any(stage == "decode" for stage, _ in steps.calls))

    def fail():
        raise RuntimeError("bad chunk")

    steps.before["prefill"] = fail
    doomed = engine.submit([9] * 10, SamplingParams(max_tokens=3, seed=2))
    release.set()
    (failed,) = replies(doomed)
    assert failed[-1].finish_reason == "error" and "bad chunk" in failed[-1].error
    assert tokens(replies(running)[0]) == expected_tokens(PROMPT, 1, 0, 6)


def test_a_repeated_prompt_reuses_its_cached_blocks(engine, steps):
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks of 4 go into the pool
    cold = engine.submit(prompt, SamplingParams(max_tokens=3, seed=7, ignore_eos=True))
    assert tokens(replies(cold)[0]) == expected_tokens(prompt, 7, 0, 3) and cold.cached_tokens == 0
    steps.calls.clear()
    warm = engine.submit(prompt, SamplingParams(max_tokens=3, seed=7, ignore_eos=True))
    assert tokens(replies(warm)[0]) == expected_tokens(prompt, 7, 0, 3) and warm.cached_tokens == 12
    loads = [detail for stage, detail in steps.calls if stage == "load_blocks"]
    assert len(loads) == 1 and len(loads[0][1]) == 3
    assert [detail for stage, detail in steps.calls if stage == "prefill"] == [(loads[0][0], 12, 1)]


def test_a_crowd_behind_one_prompt_finds_its_blocks_and_goes_in_one_batched_call():
    """Prompts queued behind the head take their cached prefix only when they join a batch, so they find
    the blocks the head saves meanwhile; their short rests then go in one call of the cheapest shape."""
    steps = FakeSteps(slots=6, batch_shapes=((2, 4), (4, 4), (4, 8)))
    engine = engine_on(steps)
    try:
        shared = list(range(1, 21))  # 5 blocks of 4
        release = held(steps, "prefill")  # the head's prefill waits until the crowd is queued
        handles = [engine.submit(shared + [30 + i], SamplingParams(max_tokens=2, seed=i, ignore_eos=True))
                   for i in range(5)]
        wait_until(lambda: engine.queue_depth == 0)
        release.set()
        for i, handle in enumerate(handles):
            assert tokens(replies(handle)[0]) == expected_tokens(shared + [30 + i], i, 0, 2)
        assert [h.cached_tokens for h in handles] == [0, 20, 20, 20, 20]
        batches = [detail for stage, detail in steps.calls if stage == "prefill_batch"]
        assert batches == [[(slot, 20, 1) for slot in (1, 2, 3, 4)]]  # one (4, 4) call: 4 rests of 1 token
    finally:
        engine.stop()


@pytest.mark.parametrize("extends", [True, False])
def test_a_finished_replys_blocks_serve_the_next_turn_where_decode_writes_what_prefill_would(extends):
    steps = FakeSteps(decode_extends_prefix=extends)
    engine = engine_on(steps)
    try:
        prompt = list(range(1, 11))  # 10 tokens: 2 full blocks of 4
        first = engine.submit(prompt, SamplingParams(max_tokens=9, seed=3, ignore_eos=True))
        reply = tokens(replies(first)[0])
        assert reply == expected_tokens(prompt, 3, 0, 9)
        following = prompt + reply + [20, 21]  # the next turn resends the reply
        nxt = engine.submit(following, SamplingParams(max_tokens=2, seed=4, ignore_eos=True))
        assert tokens(replies(nxt)[0]) == expected_tokens(following, 4, 0, 2)
        # The slot held 10 + 8 tokens (the last sampled one's KV is never written): 4 full blocks and a tail
        # of 2; without the reply's blocks, the prompt's 2 blocks and its own tail of 2.
        assert nxt.cached_tokens == (18 if extends else 10)
        assert engine.stats["reply_blocks_cached"] == (2 if extends else 0)
    finally:
        engine.stop()


def test_the_batch_plan_takes_the_fewest_rows_per_prompt():
    shapes = batch_shapes(16, 16, 1024)
    assert shapes == ((4, 4), (4, 8), (16, 2), (4, 16), (4, 32))  # by rows
    assert batch_shapes(16, 64, 1024) == ((4, 16), (4, 32))  # float32: >= 64 rows
    assert batch_shapes(4, 16, 64) == ((4, 4), (4, 8), (4, 16), (4, 32))  # 16 prompts cannot wait on 4 slots
    assert batch_shapes(4, 4, 64)[:2] == ((4, 2), (4, 4))  # a crowd of repeats on 4 slots
    assert batch_plan(shapes, [1] * 16) == ((16, 2), 16)
    assert batch_plan(shapes, [1] * 5) == ((4, 4), 4)  # 24 rows for 4 beats 40 for 5
    assert batch_plan(shapes, [8, 7, 5, 8]) == ((4, 8), 4)
    assert batch_plan(shapes, [2, 1, 3]) == ((4, 4), 3)
    assert batch_plan(shapes, [2, 12, 30, 3]) == ((4, 32), 4)
    assert batch_plan(shapes, [12, 2, 40]) == ((4, 16), 2)  # the leading prompts only
    assert batch_plan(shapes, [40, 1, 1]) is None and batch_plan(shapes, [3]) is None
    # where the kernels skip padding rows, a call's size matters little: the one that takes more prompts
    assert batch_plan(shapes, [1] * 5, SKIPPED_PADDING_COST) == ((16, 2), 5)


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_calls(steps):
    engine = engine_on(steps, prefill_chunk=8)
    steps.before["decode"] = lambda: time.sleep(0.002)  # the stream stays live while the long prompt prefills
    try:
        running = engine.submit(PROMPT, SamplingParams(max_tokens=30, seed=1, ignore_eos=True))
        wait_until(lambda: any(stage == "decode" for stage, _ in steps.calls))
        long = engine.submit(list(range(40)), SamplingParams(max_tokens=2, seed=2, ignore_eos=True))
        assert tokens(replies(long)[0]) == expected_tokens(list(range(40)), 2, 0, 2)
        assert tokens(replies(running)[0]) == expected_tokens(PROMPT, 1, 0, 30)
        stages = [(stage, detail) for stage, detail in steps.calls if stage in ("prefill", "decode")]
        chunks = [i for i, (stage, detail) in enumerate(stages) if stage == "prefill" and detail[1] > 0]
        assert chunks and all(detail[2] <= 8 for stage, detail in stages[chunks[0] - 1:] if stage == "prefill")
        assert all(stages[i - 1][0] == "decode" for i in chunks)  # live streams advance between chunks
    finally:
        engine.stop()


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([EOS + 5], SamplingParams(), "outside the vocabulary"),
    ([1] * 64, SamplingParams(), "context holds 64"),
    (PROMPT, SamplingParams(temperature=float("nan")), "finite"),
    (PROMPT, SamplingParams(top_p=0.0), "top_p"),
    (PROMPT, SamplingParams(logit_bias={EOS + 1: 1.0}), "logit_bias token id"),
])
def test_what_the_engine_cannot_run_is_refused_before_queueing(engine, steps, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, params)
    assert engine.queue_depth == 0 and not any(stage.startswith("prefill") for stage, _ in steps.calls)
    # settings outside an API's ranges but within the engine's are the API's business, not refused here
    (events,) = replies(engine.submit(PROMPT, SamplingParams(max_tokens=2, temperature=5.0, presence_penalty=3.0,
                                                               logit_bias={1: 150.0}, ignore_eos=True)))
    assert len(tokens(events)) == 2


def test_more_choices_than_slots_wait_in_groups_and_share_the_prompt(engine, steps):
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks of 4 for the later groups to reuse
    handle = engine.submit(prompt, SamplingParams(n=10, max_tokens=3, seed=21, ignore_eos=True))
    choices = replies(handle)
    assert [tokens(c) for c in choices] == [expected_tokens(prompt, 21, i, 3) for i in range(10)]
    assert handle.cached_tokens == 0  # what the first group found
    prefills = [detail for stage, detail in steps.calls if stage == "prefill"]
    loads = [detail for stage, detail in steps.calls if stage == "load_blocks"]
    assert prefills[0] == (prefills[0][0], 0, 13) and len(loads) == 2  # groups of 4, 4, 2: two reuse the blocks
    assert all(start == 12 and size == 1 for _, start, size in prefills[1:])
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def test_a_scored_prompt_gets_every_tokens_logprob_and_the_same_reply(engine, steps):
    prompt = list(range(1, 20))  # 19 tokens: scoring chunks of 8, 8, 3
    plain = engine.submit(prompt, SamplingParams(max_tokens=3, seed=2, ignore_eos=True))
    assert tokens(replies(plain)[0]) == expected_tokens(prompt, 2, 0, 3) and plain.prompt_logprobs is None
    steps.calls.clear()
    scored = engine.submit(prompt, SamplingParams(max_tokens=3, seed=2, ignore_eos=True, prompt_logprobs=2))
    assert tokens(replies(scored)[0]) == expected_tokens(prompt, 2, 0, 3)  # the reply does not change
    scores = scored.prompt_logprobs
    assert [s.token_id for s in scores] == prompt and scores[0].logprob is None and scores[0].top_logprobs == ()
    for score in scores[1:]:  # the fake's numbers: token t scores -t / 10, alternatives t + 1
        assert score.logprob == pytest.approx(-score.token_id / 10)
        assert [(t.token_id, t.logprob) for t in score.top_logprobs] == [(score.token_id + 1, pytest.approx(-(score.token_id + 1) / 10))] * 2
    # every token computed (the cached blocks of the first request are not used), in scoring chunks
    assert scored.cached_tokens == 0 and not [c for c in steps.calls if c[0] in ("load_blocks", "prefill")]
    assert [detail[1:] for stage, detail in steps.calls if stage == "score"] == [(0, 8), (8, 8), (16, 3)]


def test_a_scored_prompt_with_no_tokens_to_generate_ends_after_its_prompt(engine, steps):
    handle = engine.submit(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=0, n=2))
    choices = replies(handle)
    assert [[(e.token_id, e.finish_reason) for e in c] for c in choices] == [[(None, "length")]] * 2
    assert len(handle.prompt_logprobs) == len(PROMPT) and all(s.top_logprobs == () for s in handle.prompt_logprobs)
    assert engine.busy_slots == 0 and not [c for c in steps.calls if c[0] == "insert"]
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(PROMPT, SamplingParams(max_tokens=0))


class _ThreadKiller(BaseException):
    """What no loop iteration survives (the loop catches Exception, as it must, and nothing broader)."""


def test_a_dead_engine_thread_ends_every_request_and_refuses_new_ones(steps):
    engine = engine_on(steps)
    try:
        release = held(steps, "decode")
        running = engine.submit(PROMPT, SamplingParams(max_tokens=50, seed=1, ignore_eos=True))
        wait_until(lambda: engine.busy_slots == 1)
        waiting = [engine.submit(PROMPT, SamplingParams(n=4, max_tokens=5, seed=2)) for _ in range(2)]

        def die():
            release.wait(10)
            raise _ThreadKiller()

        steps.before["decode"] = die
        release.set()
        for handle in [running, *waiting]:  # nobody is left waiting: each choice ends with the reason
            ends = [e for events in handle.result().values() for e in events if e.finish_reason]
            assert ends and all(e.finish_reason == "error" and "engine stopped" in e.error for e in ends)
        assert not engine.healthy and "_ThreadKiller" in engine.failure
        with pytest.raises(EngineStoppedError, match="engine stopped"):
            engine.submit(PROMPT, SamplingParams(max_tokens=2))
    finally:
        engine.stop()


@pytest.mark.parametrize("padding_cost", [1.0, SKIPPED_PADDING_COST])
def test_a_prompts_rest_is_split_into_the_cheapest_calls(padding_cost):
    """``first_chunks`` against every split into buckets (brute force, the same cost: a call's fixed rows
    plus its real rows plus its padding rows at ``padding_cost``): the cheapest, and the examples its
    docstring gives, where padding costs a real row and where the kernels skip it."""
    import functools

    from flaxchat.sampling.shapes import CALL_COST_ROWS, first_chunks

    buckets = (4, 16, 64, 256)
    first = first_chunks(buckets, 300, padding_cost=padding_cost)

    def call_cost(tokens: int, bucket: int) -> float:
        return CALL_COST_ROWS + tokens + padding_cost * (bucket - tokens)

    @functools.cache
    def cheapest(n: int) -> float:
        if n <= 0:
            return 0.0
        return min(call_cost(min(b, n), b) + cheapest(n - b) for b in buckets)

    def plan(n: int) -> list[int]:
        calls = []
        while n > 0:
            calls.append(first[n])
            n -= first[n]
        return calls

    for n in range(1, 301):
        calls = plan(n)
        assert sum(calls) == n and all(0 < c <= buckets[-1] for c in calls)
        cost = sum(call_cost(c, next(b for b in buckets if b >= c)) for c in calls)
        assert cost == pytest.approx(cheapest(n)), (n, calls)
    if padding_cost == 1.0:
        assert plan(9) == [9] and plan(25) == [16, 9] and plan(129) == [64, 64, 1] and plan(8) == [4, 4]
    else:  # padding is nearly free: the fewest calls
        assert plan(9) == [9] and plan(25) == [25] and plan(129) == [129] and plan(8) == [8] and plan(300) == [256, 44]
