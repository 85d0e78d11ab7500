"""The lockstep protocol (``sampling/lockstep.py``) in one process: a real engine drives a ``Leader`` whose
calls a second ``EngineSteps`` on the same params replays on another thread; after a mixed workload both
hold the same device state, bit for bit. The two-process server is ``tests/test_multihost.py``."""

from __future__ import annotations

import gc
import json
import queue
import threading

import jax
import numpy as np
import pytest

from flaxchat.sampling.constraints import json_schema_grammar
from flaxchat.sampling.engine import Engine, EngineConfig, context_length
from flaxchat.sampling.lockstep import Leader, LockstepError, LogitsRef, decode, encode, follow, settings_digest
from flaxchat.sampling.params import SamplingParams
from flaxchat.sampling.sampler import choice_key, make_row_request
from flaxchat.sampling.steps import EngineSteps
from tests.engine_fixtures import tiny_model


class QueueChannel:
    """The in-process channel: one follower."""

    def __init__(self) -> None:
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.sent: list[dict] = []

    def send(self, message: bytes) -> None:
        self.sent.append(json.loads(message))
        self.messages.put(message)

    def receive(self) -> bytes:
        return self.messages.get(timeout=120)


def test_the_codec_keeps_every_argument_exactly():
    row = make_row_request(320, temperature=0.7, top_p=0.9, logit_bias={5: 2.5, 7: -100.0}, prompt=[1, 2, 3])
    key = choice_key(2**63 + 5, 3)
    masks = {2: np.arange(10, dtype=np.uint32), 5: np.zeros(10, np.uint32)}
    args = [3, [1, 2, 3], [(0, [4, 5], 1), (2, [6], 0)], (16, 2), masks, row, key, np.int32(7), np.float32(0.5),
            None, True]
    data = json.loads(json.dumps(encode(args)))
    back = decode(data, lambda call, index: pytest.fail("no references here"))
    assert back[:4] == args[:4] and isinstance(back[3], tuple) and isinstance(back[2][0], tuple)
    assert sorted(back[4]) == [2, 5] and all(np.array_equal(back[4][k], masks[k]) for k in masks)
    for name in ("temperature", "top_p", "bias", "seen", "allowed", "top_logprobs"):
        a, b = np.asarray(getattr(row, name)), getattr(back[5], name)
        b = np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    assert np.array_equal(jax.random.key_data(back[6]), jax.random.key_data(key))
    assert jax.random.key_impl(back[6]) == jax.random.key_impl(key)
    # numpy scalars keep their dtype (a Python int would reach a jit weakly typed: another program)
    assert back[7].dtype == np.int32 and back[7] == 7 and back[8].dtype == np.float32 and back[9:] == [None, True]
    # a settings row of the default model's vocabulary (bias, seen: 246 KB) is mostly zeros: sent compressed
    assert len(json.dumps(encode(make_row_request(49152, logit_bias={5: 1.0}, prompt=[1, 2])))) < 8000
    assert decode(encode([LogitsRef(4, 1, None)]), lambda call, index: ("resolved", call, index)) == [("resolved", 4, 1)]
    with pytest.raises(TypeError):
        encode(object())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("lockstep"))


def _pair(model, **config):
    cfg, params, tokenizer = model
    config = EngineConfig(**{"slots": 4, "max_len": 128, "warmup": False, "prefix_cache_mb": 0.25, **config})
    build = lambda: EngineSteps.for_engine(cfg, params, context_length(cfg, config), config)  # noqa: E731
    return cfg, tokenizer, config, build(), build()


def test_a_follower_ends_with_the_leaders_state_bit_for_bit(model):
    cfg, tokenizer, config, leader_steps, follower_steps = _pair(model)
    settings = settings_digest("tiny", cfg, config)
    channel = QueueChannel()
    followed = []
    thread = threading.Thread(target=lambda: followed.append(follow(follower_steps, channel, settings)))
    thread.start()
    leader = Leader(leader_steps, channel, settings)
    engine = Engine(cfg, model[1], tokenizer, config, steps=leader).start()
    try:
        system = list(range(3, 40))  # shared by the first two: the second loads cached blocks
        handles = [engine.submit(system + [50, 51], SamplingParams(max_tokens=8, temperature=0.0)),
                   engine.submit(system + [60], SamplingParams(max_tokens=9, temperature=0.9, seed=11, n=2)),
                   engine.submit(list(range(5, 25)), SamplingParams(max_tokens=6, temperature=1.0, seed=3,
                                                                    logprobs=True, top_logprobs=2,
                                                                    logit_bias={7: 5.0}, presence_penalty=0.5)),
                   engine.submit(list(range(9, 90)), SamplingParams(max_tokens=5, temperature=0.8, seed=4)),
                   engine.submit([9, 8, 7], SamplingParams(max_tokens=12, seed=5, prompt_logprobs=1,
                                                           grammar=json_schema_grammar({"type": "object"})))]
        replies = [h.result() for h in handles]
        gc.collect()  # the finished prompts' logits: their references reach the follower with the next call
        again = engine.submit(system + [60], SamplingParams(max_tokens=9, temperature=0.9, seed=11, n=2)).result()
    finally:
        engine.stop()  # closes the leader: the follower returns
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert again == replies[1]  # from the prefix cache, the same bits
    methods = [m["method"] for m in channel.sent]
    assert methods[0] == "hello" and methods[-1] == "stop"
    for method in ("warmup", "prefill_chunk", "score_chunk", "load_blocks", "save_blocks", "copy_slot", "insert",
                   "set_allowed", "decode", "release"):
        assert method in methods, method
    assert followed[0].calls == len(methods) - 2
    assert followed[0].held <= 1  # the last prompt's logits at most; none accumulate
    mine, theirs = _host_leaves(engine._state), _host_leaves(followed[0].state)
    assert len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))


def _host_leaves(state) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)
            for leaf in jax.tree.leaves(state)]


def test_a_follower_started_with_other_settings_refuses(model):
    cfg, tokenizer, config, leader_steps, follower_steps = _pair(model)
    channel = QueueChannel()
    Leader(leader_steps, channel, settings_digest("tiny", cfg, config))
    with pytest.raises(LockstepError, match="other settings"):
        follow(follower_steps, channel, settings_digest("tiny", cfg, EngineConfig(slots=8)))


def test_a_runtime_failure_stops_the_clusters_engine(model):
    """A device call that fails in the runtime on process 0 (a collective whose peer is gone, here
    injected) may have run elsewhere: the processes are out of step, so the engine stops and says why
    (the server's /health turns 503 and new requests are refused) instead of failing request after request."""
    import time

    from flaxchat.sampling.requests import EngineStoppedError
    from tests.step_hooks import HookedSteps

    cfg, tokenizer, config, leader_steps, follower_steps = _pair(model)
    settings = settings_digest("tiny", cfg, config)
    channel = QueueChannel()
    thread = threading.Thread(target=follow, args=(follower_steps, channel, settings))
    thread.start()
    failing = threading.Event()

    def hook(stage: str) -> None:
        if stage == "decode" and failing.is_set():
            raise jax.errors.JaxRuntimeError("INTERNAL: Gloo AllGather failed: Connection closed by peer")

    engine = Engine(cfg, model[1], tokenizer, config,
                    steps=Leader(HookedSteps(leader_steps, hook), channel, settings)).start()
    try:
        assert engine.submit([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0)).result()[0][-1].finish_reason
        failing.set()
        events = engine.submit([5, 6, 8], SamplingParams(max_tokens=4, temperature=0.0)).result()[0]
        assert events[-1].finish_reason == "error"
        deadline = time.time() + 30
        while engine.healthy and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.healthy and "out of step" in engine.failure
        with pytest.raises(EngineStoppedError):
            engine.submit([5], SamplingParams(max_tokens=2))
    finally:
        engine.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()  # stopping the engine still releases the followers
