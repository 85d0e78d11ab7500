"""The engine on a tiny random model: determinism, static shapes, scheduling, errors, stop conditions."""

import asyncio
import threading
import time

import numpy as np
import pytest

from flaxchat.sampling.requests import PromptTooLongError, QueueFullError, collect_text
from flaxchat.sampling.params import SamplingParams
from tests.engine_fixtures import tiny_engine
from tests.greedy import greedy_without_cache
from tests.step_hooks import set_step_hook

PROMPTS = [[5, 40, 300, 17, 17, 9], [100, 64, 7] * 9, list(range(3, 60)), [12], [250, 251, 252, 253] * 20]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = tiny_engine(tmp_path_factory.mktemp("engine"), warmup=True)  # test_no_compiles_while_serving
    yield engine
    engine.stop()


@pytest.fixture(autouse=True)
def _clean(engine):
    set_step_hook(engine, None)
    yield
    set_step_hook(engine, None)
    deadline = time.time() + 10
    while (engine.busy_slots or engine.queue_depth) and time.time() < deadline:
        time.sleep(0.01)


def tokens_and_logprobs(events):
    return [e.token_id for e in events if e.token_id is not None], [e.logprob for e in events if e.token_id is not None]


SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True,
                        logprobs=True, top_logprobs=5, presence_penalty=0.3, frequency_penalty=0.2)


def run(engine, prompt, params):
    return engine.submit(prompt, params).result()


def test_same_seed_same_tokens(engine):
    first, second = run(engine, PROMPTS[0], SEEDED), run(engine, PROMPTS[0], SEEDED)
    assert tokens_and_logprobs(first[0]) == tokens_and_logprobs(second[0])
    assert len(first[0]) == 24 and first[0][-1].finish_reason == "length"
    other = run(engine, PROMPTS[0], SamplingParams(**{**SEEDED.__dict__, "seed": 1235}))
    assert tokens_and_logprobs(other[0])[0] != tokens_and_logprobs(first[0])[0]


def test_bit_identical_alone_or_with_others_in_any_slot(engine):
    alone = tokens_and_logprobs(run(engine, PROMPTS[0], SEEDED)[0])  # lands in slot 0
    others = [
        (PROMPTS[1], SamplingParams(max_tokens=40, temperature=1.3, seed=1, ignore_eos=True)),
        (PROMPTS[2], SamplingParams(max_tokens=7, temperature=0.0, repetition_penalty=1.3)),
        (PROMPTS[4], SamplingParams(max_tokens=30, temperature=0.7, min_p=0.1, logit_bias={9: 5.0}, n=1)),
    ]
    for delay_steps in (0, 3, 11):
        handles = [engine.submit(p, s) for p, s in others]
        seen = 0
        for _ in handles[0]:  # let the others run a few steps before the seeded request arrives
            seen += 1
            if seen >= delay_steps:
                break
        target = engine.submit(PROMPTS[0], SEEDED)
        together = tokens_and_logprobs(target.result()[0])
        for h in handles:
            for _ in h:
                pass
        assert together == alone, f"arrival after {delay_steps} steps changed the result"


def test_top_alternatives_of_a_neighbour_change_nothing_for_a_row_without_them(engine):
    """The sampler computes the top alternatives only when a live row reports them: a seeded request that
    asks for none gets the same tokens and logprobs alone (no row wants them) as next to one that asks for
    20 (the same program's other branch), and that neighbour gets its 20."""
    plain = SamplingParams(**{**SEEDED.__dict__, "top_logprobs": 0})
    alone = tokens_and_logprobs(run(engine, PROMPTS[0], plain)[0])
    asking = engine.submit(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0.8, seed=5, ignore_eos=True,
                                                      logprobs=True, top_logprobs=20))
    next(iter(asking))
    together = run(engine, PROMPTS[0], plain)[0]
    assert tokens_and_logprobs(together) == alone
    assert all(e.top_logprobs == () for e in together)
    reported = [e for e in asking.result()[0] if e.token_id is not None]
    assert reported and all(len(e.top_logprobs) == 20 for e in reported)


def test_n_choices_differ_and_equal_each_choice_alone(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=99, n=3, ignore_eos=True, logprobs=True)
    grouped = run(engine, PROMPTS[1], params)
    sequences = [tokens_and_logprobs(grouped[i]) for i in range(3)]
    assert len({tuple(s[0]) for s in sequences}) == 3
    for i in range(3):
        alone = run(engine, PROMPTS[1], SamplingParams(**{**params.__dict__, "n": 1, "choice_offset": i}))
        assert tokens_and_logprobs(alone[i]) == sequences[i]


def test_temperature_zero_equals_the_greedy_reference(engine):
    reference = greedy_without_cache(engine.cfg, engine.steps.params, PROMPTS[2], 20)
    events = run(engine, PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert tokens_and_logprobs(events)[0] == reference


def test_no_compiles_while_serving(engine):
    compiled = engine.compile_count
    rng = np.random.default_rng(0)
    handles = []
    for i in range(50):
        prompt = rng.integers(3, 320, size=int(rng.integers(1, 120))).tolist()
        params = SamplingParams(
            max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
            top_p=float(rng.choice([1.0, 0.9, 0.5])), top_k=int(rng.choice([0, 5, 40])),
            min_p=float(rng.choice([0.0, 0.05])), presence_penalty=float(rng.uniform(-2, 2)),
            frequency_penalty=float(rng.uniform(-2, 2)), repetition_penalty=float(rng.choice([1.0, 1.2])),
            logit_bias={int(rng.integers(0, 320)): float(rng.uniform(-100, 100))}, seed=i,
            n=int(rng.choice([1, 1, 2])), stop=("ab",) if i % 3 == 0 else (), logprobs=bool(i % 2),
            top_logprobs=int(rng.integers(0, 21)),
        )
        handles.append(engine.submit(prompt, params))
        if len(handles) >= 8:  # stay under the queue limit
            handles.pop(0).result()
    for handle in handles:
        handle.result()
    assert engine.compile_count == compiled


def test_cancel_frees_the_slot(engine):
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True))
    events = []
    for event in handle:
        events.append(event)
        if len(events) == 3:
            handle.cancel()
    assert events[-1].finish_reason == "cancelled" and len(events) < 100
    deadline = time.time() + 5
    while engine.busy_slots and time.time() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0


def test_prompt_too_long_is_refused_before_taking_a_slot(engine):
    with pytest.raises(PromptTooLongError, match="128"):
        engine.submit(list(range(3, 131)), SamplingParams())
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def test_bad_settings_are_refused(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([5], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="logit_bias token id 999"):
        engine.submit([5], SamplingParams(logit_bias={999: 1.0}))
    with pytest.raises(ValueError, match="finite"):
        engine.submit([5], SamplingParams(temperature=float("inf")))


def test_full_queue_raises(tmp_path):
    small = tiny_engine(tmp_path, slots=1, queue_size=1)
    try:
        running = small.submit(PROMPTS[0], SamplingParams(max_tokens=120, ignore_eos=True))
        next(iter(running))  # admitted: the slot is busy
        waiting = small.submit(PROMPTS[0], SamplingParams(max_tokens=2, ignore_eos=True))
        with pytest.raises(QueueFullError, match="queue is full"):
            small.submit(PROMPTS[0], SamplingParams(max_tokens=2))
        running.cancel()
        assert waiting.result()[0][-1].finish_reason == "length"
    finally:
        small.stop()


def test_a_failed_decode_step_fails_only_its_requests(engine):
    failures = iter([RuntimeError("injected")])

    def hook(step):
        if step == "decode":
            exc = next(failures, None)
            if exc:
                raise exc

    set_step_hook(engine, hook)
    failed = engine.submit(PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True)).result()[0]
    assert failed[-1].finish_reason == "error" and "injected" in failed[-1].error
    fine = run(engine, PROMPTS[0], SEEDED)[0]
    set_step_hook(engine, None)
    assert tokens_and_logprobs(fine) == tokens_and_logprobs(run(engine, PROMPTS[0], SEEDED)[0])


def test_a_failed_prefill_leaves_running_requests_alone(engine):
    expected = tokens_and_logprobs(run(engine, PROMPTS[0], SEEDED)[0])
    running = engine.submit(PROMPTS[0], SEEDED)
    first = next(iter(running))
    set_step_hook(engine, lambda step: (_ for _ in ()).throw(RuntimeError("bad prefill")) if step == "prefill" else None)
    broken = engine.submit(PROMPTS[1], SamplingParams(max_tokens=5)).result()[0]
    set_step_hook(engine, None)
    rest = list(running)
    assert broken[-1].finish_reason == "error" and "bad prefill" in broken[-1].error
    assert tokens_and_logprobs([first] + rest) == expected


def test_stop_string_cuts_the_text(engine):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = collect_text(run(engine, PROMPTS[3], params)[0])
    assert len(full) > 6
    stop = full[3:6]
    cut = run(engine, PROMPTS[3], SamplingParams(**{**params.__dict__, "stop": (stop,)}))[0]
    assert collect_text(cut) == full[: full.find(stop)]
    assert cut[-1].finish_reason == "stop"


def test_stop_token_and_context_length(engine):
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    tokens = tokens_and_logprobs(run(engine, PROMPTS[3], greedy)[0])[0]
    stop_at = tokens[5]
    stopped = run(engine, PROMPTS[3], SamplingParams(**{**greedy.__dict__, "stop_token_ids": (stop_at,)}))[0]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].token_id == stop_at
    assert tokens_and_logprobs(stopped)[0] == tokens[: tokens.index(stop_at) + 1]
    full_context = run(engine, list(range(3, 120)), SamplingParams(max_tokens=500, ignore_eos=True))[0]
    assert len(full_context) == 128 - 117 and full_context[-1].finish_reason == "length"


def test_logprobs_and_logit_bias(engine):
    events = run(engine, PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=20,
                                                     ignore_eos=True))[0]
    for event in events:
        tops = [t.logprob for t in event.top_logprobs]
        assert len(tops) == 20 and tops == sorted(tops, reverse=True)
        assert event.top_logprobs[0].token_id == event.token_id and event.logprob == tops[0]
        assert np.exp(tops).sum() <= 1.0 + 1e-5
    biased = run(engine, PROMPTS[0], SamplingParams(max_tokens=5, temperature=1.0, logit_bias={77: 100.0}, seed=3))[0]
    assert tokens_and_logprobs(biased)[0] == [77] * 5


def test_async_handles_from_an_event_loop(engine):
    async def main():
        handles = [engine.submit(PROMPTS[i], SamplingParams(max_tokens=8, seed=i, ignore_eos=True)) for i in range(3)]
        results = []
        for handle in handles:
            results.append([event async for event in handle])
        return results

    results = asyncio.run(main())
    assert [len(r) for r in results] == [8, 8, 8]
    sync = run(engine, PROMPTS[1], SamplingParams(max_tokens=8, seed=1, ignore_eos=True))[0]
    assert tokens_and_logprobs(results[1]) == tokens_and_logprobs(sync)


def test_submit_from_many_threads(engine):
    outputs, errors = {}, []

    def client(i):
        try:
            outputs[i] = tokens_and_logprobs(run(engine, PROMPTS[i % 5], SamplingParams(max_tokens=6, seed=i,
                                                                                     ignore_eos=True))[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(len(o[0]) == 6 for o in outputs.values())


def test_several_decode_steps_per_call_give_the_same_tokens(engine, tmp_path):
    multi = tiny_engine(tmp_path, steps_per_call=3)
    try:
        for params in (SEEDED, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)):
            assert tokens_and_logprobs(run(multi, PROMPTS[0], params)[0]) == \
                tokens_and_logprobs(run(engine, PROMPTS[0], params)[0])
        greedy = tokens_and_logprobs(run(engine, PROMPTS[3], SamplingParams(max_tokens=20, temperature=0.0,
                                                                             ignore_eos=True))[0])[0]
        stop_at = greedy[4]
        stopped = run(multi, PROMPTS[3], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                        stop_token_ids=(stop_at,)))[0]
        assert tokens_and_logprobs(stopped)[0] == greedy[: greedy.index(stop_at) + 1]  # extra tokens discarded
    finally:
        multi.stop()


def test_bit_identical_when_others_make_attention_visit_more_cache_blocks(tmp_path):
    """With a 256-position cache (two 128-position blocks) a long neighbour makes every decode step visit
    both blocks; the short seeded request, which needs one, must not change by a bit."""
    wide = tiny_engine(tmp_path, max_len=256)
    try:
        alone = tokens_and_logprobs(run(wide, PROMPTS[0], SEEDED)[0])
        long_prompt = (list(range(3, 300)) * 2)[:200]
        neighbour = wide.submit(long_prompt, SamplingParams(max_tokens=50, temperature=1.0, seed=5, ignore_eos=True))
        next(iter(neighbour))
        together = tokens_and_logprobs(wide.submit(PROMPTS[0], SEEDED).result()[0])
        neighbour.result()
        assert together == alone
    finally:
        wide.stop()


def test_an_engine_started_without_warmup_compiles_on_first_use_and_answers_alike(engine, tmp_path):
    """``warmup=False`` (one-off answers, most tests): nothing but the KV check compiles at start, the steps a
    request runs compile when it runs them, and the seeded reply is the warmed-up engine's, bit for bit."""
    lazy = tiny_engine(tmp_path)
    try:
        at_start = lazy.compile_count
        assert at_start < engine.compile_count
        reply = tokens_and_logprobs(run(lazy, PROMPTS[1], SEEDED)[0])
        assert lazy.compile_count > at_start
        assert reply == tokens_and_logprobs(run(engine, PROMPTS[1], SEEDED)[0])
    finally:
        lazy.stop()


def test_a_slot_taken_over_while_a_call_is_in_flight_gets_only_its_own_tokens(engine, tmp_path):
    """The host reads a decode call's tokens while the next call runs, so a choice that finishes has one
    more step in flight, and its slot may be handed to the next request before that step's tokens are
    read. With two slots and a queue of short requests, each reply must still equal the same request run
    alone, token for token, and stop where its own limits say."""
    two_slots = tiny_engine(tmp_path, slots=2)
    try:
        requests = [(PROMPTS[i % 3], SamplingParams(max_tokens=2 + i, temperature=0.8, seed=50 + i, ignore_eos=True,
                                                    logprobs=True)) for i in range(7)]
        handles = [two_slots.submit(p, s) for p, s in requests]
        for (prompt, params), handle in zip(requests, handles):
            events = handle.result()[0]
            assert tokens_and_logprobs(events) == tokens_and_logprobs(run(engine, prompt, params)[0])
            assert len(tokens_and_logprobs(events)[0]) == params.max_tokens
            assert events[-1].finish_reason == "length"
    finally:
        two_slots.stop()


def test_a_script_that_ends_with_the_engine_decoding_exits_cleanly(tmp_path):
    """The engine thread is stopped before the interpreter finalizes: a script that leaves while a request is
    still decoding exits with 0 (before this, the daemon thread was torn down inside a device call and the
    process aborted: "terminate called ...", exit code 134)."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; from pathlib import Path\n"
        "from flaxchat.sampling.params import SamplingParams\n"
        "from flaxchat.sampling.engine import Engine, EngineConfig\n"
        "from tests.engine_fixtures import tiny_model, with_weights\n"
        "cfg, params, tokenizer = with_weights(tiny_model(Path(sys.argv[1])), 'int4')\n"
        "engine = Engine(cfg, params, tokenizer, EngineConfig(slots=2, max_len=512)).start()\n"
        "handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True, seed=1))\n"
        "print('first', next(iter(handle)).token_id is not None, flush=True)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first True" in done.stdout and "terminate called" not in done.stderr
