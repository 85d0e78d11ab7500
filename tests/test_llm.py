"""``flaxchat.LLM`` (offline) against the real server on its own engine, and ``flaxchat replay``.

The seed contract across the two ways in: the same request (same seed) gives the same tokens, text and
logprobs offline as through HTTP, with the server under load from 16 concurrent clients and the offline
batch on another engine with another slot count. Replay regenerates a results file: identical on an
unchanged model; after a change of weights or tokenizer it says which part changed.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import flaxchat
from flaxchat.checkpoints.store import load_model, model_dir, store_model
from flaxchat.launch import LaunchOptions, launch
from flaxchat.replay import replay
from flaxchat.serve.app import create_app
from flaxchat.serve.server import BackgroundServer
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model
from tests.server_fixtures import openai_client

OPTIONS = dict(max_len=1024, weights="float32", kv_dtype="float32", prefix_cache_mb=4.0,
               warmup=False)  # steps compile on first use: only the shapes these tests run
SAMPLING = dict(max_tokens=6, temperature=0.9, logprobs=True, top_logprobs=2)
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
    "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A store of its own holding nothing yet; the tiny model's GGUF written next to it."""
    folder = tmp_path_factory.mktemp("llm_home")
    previous = os.environ.get("FLAXCHAT_HOME")
    os.environ["FLAXCHAT_HOME"] = str(folder)
    hf = make_tiny_model("llama", folder / "hf", max_position_embeddings=1024)
    write_gguf(hf, folder / "tiny-llm.gguf")
    yield folder
    if previous is None:
        os.environ.pop("FLAXCHAT_HOME", None)
    else:
        os.environ["FLAXCHAT_HOME"] = previous


@pytest.fixture(scope="module")
def llm(home):
    """The offline LLM, imported from the GGUF file on first use (4 slots)."""
    with flaxchat.LLM(home / "tiny-llm.gguf", slots=4, **OPTIONS) as model:
        yield model


@pytest.fixture(scope="module")
def server(llm):
    """The HTTP server over a second engine for the same stored model (8 slots)."""
    served = launch(llm.id, LaunchOptions(slots=8, **OPTIONS))
    background = BackgroundServer(create_app(served)).start()
    yield background
    background.stop()
    served.engine.stop()


def _conversation(i: int) -> list[dict]:
    turns = [{"role": "user", "content": f"Question {i}: what is {i} + {i * 7 % 13}?"}]
    if i % 3 == 0:  # some longer, multi-turn, with a system prompt
        turns = [{"role": "system", "content": "Answer briefly."}, *turns,
                 {"role": "assistant", "content": f"About {i}."}, {"role": "user", "content": "Why?" * (i % 5 + 1)}]
    return turns


def _wire_logprobs(choice) -> list[dict]:
    return [entry.model_dump(exclude_none=True) for entry in choice.logprobs.content]


def test_offline_chat_equals_the_server_for_200_seeded_conversations(llm, server):
    conversations = [_conversation(i) for i in range(200)]
    offline = llm.chat(conversations, per_item=[{"seed": 1000 + i} for i in range(200)], progress=False, **SAMPLING)
    client = openai_client(server)

    def ask(i: int):
        return client.chat.completions.create(model=llm.id, messages=conversations[i], seed=1000 + i, **SAMPLING)

    with ThreadPoolExecutor(16) as pool:  # the server under load while it answers
        online = list(pool.map(ask, range(200)))
    assert [r.index for r in offline] == list(range(200))
    for i, (mine, theirs) in enumerate(zip(offline, online)):
        (choice,) = theirs.choices
        assert mine.text == choice.message.content, i
        assert mine.finish_reason == choice.finish_reason
        assert [dict(e, top_logprobs=[dict(t) for t in e["top_logprobs"]]) for e in mine.logprobs] == \
            _wire_logprobs(choice), i
        assert len(mine.token_ids) == theirs.usage.completion_tokens
        assert mine.seed == 1000 + i and mine.fingerprint == theirs.system_fingerprint
    assert len({r.text for r in offline}) > 150  # the prompts and draws really differ


def test_n_json_schema_and_tools_equal_the_server(llm, server):
    client = openai_client(server)
    conversations = [_conversation(i) for i in range(6)]
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    offline = llm.chat(conversations, seed=9, n=3, max_tokens=24, response_format=fmt, progress=False)
    for conversation, result in zip(conversations, offline):
        online = client.chat.completions.create(model=llm.id, messages=conversation, seed=9, n=3, max_tokens=24,
                                                response_format=fmt)
        assert [c.text for c in result.choices] == [c.message.content for c in online.choices]
        for choice in result.choices:
            jsonschema.validate(json.loads(choice.text), SCHEMA)
    called = llm.chat(conversations[:4], seed=3, tools=[TOOL], tool_choice="required", max_tokens=60, progress=False)
    for conversation, result in zip(conversations, called):
        online = client.chat.completions.create(model=llm.id, messages=conversation, seed=3, tools=[TOOL],
                                                tool_choice="required", max_tokens=60)
        calls = result.choices[0].message["tool_calls"]
        assert [c["function"] for c in calls] == [c.function.model_dump() for c in online.choices[0].message.tool_calls]
        assert calls and all(json.loads(c["function"]["arguments"]).keys() == {"city"} for c in calls)
        assert result.finish_reason == online.choices[0].finish_reason


def test_generate_equals_the_completions_endpoint(llm, server):
    client = openai_client(server)
    prompts = ["Once upon a time", "def add(a, b):", [5, 6, 7, 8, 9]]
    offline = llm.generate(prompts, seed=5, max_tokens=8, temperature=0.8, progress=False)
    for prompt, result in zip(prompts, offline):
        online = client.completions.create(model=llm.id, prompt=prompt, seed=5, max_tokens=8, temperature=0.8)
        assert result.text == online.choices[0].text
        assert result.endpoint == "completion" and len(result.token_ids) == online.usage.completion_tokens
    assert offline[2].prompt_token_ids == (5, 6, 7, 8, 9)


def test_score_is_the_sum_of_the_prompt_logprobs_the_server_reports(llm, server):
    """``score`` against the server's echoed prompt logprobs of the same tokens (transformers: below and
    in test_default_model)."""
    scores = llm.score(["The cat", "2 + 2 ="], [" sat on the mat", " 4"], progress=False)
    client = openai_client(server)
    for score in scores:
        ids = [*score.prompt_token_ids, *score.continuation_token_ids]
        online = client.completions.create(model=llm.id, prompt=ids, max_tokens=0, echo=True, logprobs=1)
        expected = online.choices[0].logprobs.token_logprobs[len(score.prompt_token_ids):]
        assert list(score.token_logprobs) == expected
        assert score.total == pytest.approx(sum(expected), abs=1e-9)
    assert scores[0].continuation_token_ids == tuple(llm.tokenizer.encode(" sat on the mat"))


def test_score_equals_transformers_on_the_tiny_model(llm, home):
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(home / "hf", dtype=torch.float32).eval()
    (score,) = llm.score([[1, 40, 41, 42]], [[50, 51, 52, 53, 54]], progress=False)
    ids = torch.tensor([[1, 40, 41, 42, 50, 51, 52, 53, 54]])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(ids).logits[0].double(), dim=-1)
    expected = [float(logprobs[i - 1, ids[0, i]]) for i in range(4, 9)]
    np.testing.assert_allclose(score.token_logprobs, expected, atol=1e-4)
    assert abs(score.total - sum(expected)) <= 1e-4


def test_bad_settings_are_refused_before_anything_runs(llm):
    from pydantic import ValidationError

    from flaxchat.chat.errors import ChatError

    with pytest.raises(ValidationError):
        llm.chat([[{"role": "user", "content": "hi"}]], temperature="hot")
    with pytest.raises(ChatError, match="top_logprobs requires logprobs"):
        llm.chat([[{"role": "user", "content": "hi"}]] * 3, top_logprobs=2)
    with pytest.raises(ValueError, match="stream"):
        llm.chat([{"role": "user", "content": "hi"}], stream=True)
    assert llm.served.engine.busy_slots == 0 and llm.served.engine.queue_depth == 0


def test_replay_is_identical_then_names_the_changed_part(llm, home, tmp_path):
    results = llm.chat([_conversation(i) for i in range(5)], seed=77, progress=False, **SAMPLING)
    results += llm.generate(["Once upon a time"], seed=2, max_tokens=5, progress=False)
    path = flaxchat.write_jsonl(results, tmp_path / "results.jsonl")
    assert flaxchat.read_results(path) == results
    verdicts = replay(path)
    assert [v.identical for v in verdicts] == [True] * 6 and all(not v.changed for v in verdicts)

    stored = load_model(llm.id, weights="float32")
    folder = model_dir(llm.id)
    original_tokenizer = (folder / "tokenizer.json").read_text()
    # the tokenizer: two of the prompts' token strings trade ids, so every prompt encodes differently
    tokenizer = json.loads(original_tokenizer)
    vocab, added = tokenizer["model"]["vocab"], {t["id"] for t in tokenizer["added_tokens"]}
    by_id = {i: text for text, i in vocab.items()}
    first, second = list(dict.fromkeys(t for t in results[0].prompt_token_ids if t not in added))[:2]
    vocab[by_id[first]], vocab[by_id[second]] = second, first
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    verdicts = replay(path)
    assert not any(v.identical for v in verdicts[:5])
    assert all(v.changed == ("tokenizer",) for v in verdicts)
    assert "changed: tokenizer" in verdicts[0].describe()
    (folder / "tokenizer.json").write_text(original_tokenizer)

    # the weights: the same store entry, one norm scaled
    params = dict(stored.params, final_norm=dict(stored.params["final_norm"]))
    params["final_norm"]["scale"] = np.asarray(params["final_norm"]["scale"]) * 1.5
    files = {"tokenizer.json": original_tokenizer.encode()}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    store_model(llm.id, stored.cfg, params, files, config, {k: v for k, v in manifest.items()
                                                            if k not in ("name", "params_sha256")})
    verdicts = replay(path)
    assert not any(v.identical for v in verdicts[:5])  # (their logprobs changed; the last has none to compare)
    assert all(v.changed == ("weights",) for v in verdicts)
