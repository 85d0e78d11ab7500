"""Reasoning: the think-tag splitter on scripted streams, thinking budgets in the engine, and reasoning_content
end to end with a tiny random Qwen3-architecture model and the Qwen3 chat template."""

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxchat.sampling.constraints import json_schema_grammar
from flaxchat.sampling.params import SamplingParams, ThinkingPlan
from flaxchat.chat.format import ChatFormat
from flaxchat.chat.reasoning import ReasoningSplitter
from tests.engine_fixtures import tiny_engine
from tests.server_fixtures import TINY_ID, start_tiny_server

QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
QWEN3_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
TINY_QWEN3 = {"kind": "qwen3", "context": 1024, "extra_tokens": QWEN3_TOKENS, "chat_template": QWEN3_TEMPLATE}

# (reply text, prompt opened the think block, expected reasoning, expected content)
SCRIPTS = [
    ("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", False, "Let me see: 2+2.", "It is 4."),
    ("  <think>a<b</thin c</think>d", False, "a<b</thin c", "d"),
    ("Let me see.\n</think>\n\nFour.", True, "Let me see.", "Four."),
    ("Plain answer, <think> later is text.", False, "", "Plain answer, <think> later is text."),
    ("<think>cut off while thinking", False, "cut off while thinking", ""),
    ("<thi", False, "", "<thi"),
    ("<think></think>", False, "", ""),
    ("</think>x", True, "", "x"),
]


def split_all(pieces: list[str], open_at_start: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(open_at_start)
    reasoning, content = "", ""
    for piece in pieces:
        r, c = splitter.push(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("text,opened,reasoning,content", SCRIPTS)
def test_splitter_at_every_split_position(text, opened, reasoning, content):
    assert split_all([text], opened) == (reasoning, content)
    assert split_all(list(text), opened) == (reasoning, content)  # one character at a time
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert split_all([text[:i], text[i:j], text[j:]], opened) == (reasoning, content), (i, j)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SCRIPTS), st.lists(st.integers(0, 60), max_size=8))
def test_splitter_any_chunking(script, cuts):
    text, opened, reasoning, content = script
    cuts = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert split_all(pieces, opened) == (reasoning, content)


def test_effort_maps_to_template_switch_and_budget(tmp_path):
    engine = tiny_engine(tmp_path, TINY_QWEN3, max_len=256)
    try:
        tok = engine.tokenizer
        qwen3 = ChatFormat(QWEN3_TEMPLATE, tok)
        low = qwen3.reasoning("<|im_start|>assistant\n", "low", max_tokens=100, constrained=False)
        assert low.plan.budget == 50 and low.plan.open_ids == tuple(tok.encode("<think>\n"))
        assert qwen3.reasoning("x", "high", 100_000, False).plan.budget == 8192
        assert qwen3.reasoning("x", None, 100, False).plan is None  # unlimited, nothing to force
        assert qwen3.reasoning("x", None, 100, True).plan.budget == 50  # room for the answer
        assert qwen3.reasoning("x", "minimal", 100, False) is None
        assert qwen3.reasoning("x<think>\n\n</think>\n\n", None, 100, False) is None
        opened = qwen3.reasoning("x<think>\n", "low", 100, False)
        assert opened.open_at_start and opened.plan.open_ids == ()
        assert ChatFormat("{{ messages }}", tok).reasoning("x", "high", 100, False) is None  # model does not think
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def qwen3_engine(tmp_path_factory):
    engine = tiny_engine(tmp_path_factory.mktemp("qwen3"), TINY_QWEN3, max_len=512, slots=4)
    yield engine
    engine.stop()


def _plan(tok, budget):
    return ThinkingPlan(tuple(tok.encode("<think>\n")), tuple(tok.encode("\n</think>\n\n")), "</think>", budget)


@pytest.mark.parametrize("budget", [0, 1, 7, 30])
def test_budget_forces_the_close(qwen3_engine, budget):
    tok = qwen3_engine.tokenizer
    plan = _plan(tok, budget)
    closed = 0
    for seed in range(12):  # until three replies have closed their thinking
        events = qwen3_engine.submit([5, 40, 100], SamplingParams(max_tokens=80, seed=seed, thinking=plan)).result()[0]
        tokens = [e.token_id for e in events if e.token_id is not None]
        assert tuple(tokens[: len(plan.open_ids)]) == plan.open_ids
        if tok.token_to_id("</think>") not in tokens:  # the (random) model ended its reply while thinking
            assert tokens[-1] in tok.stop_ids and len(tokens) - len(plan.open_ids) <= budget + 1, tokens
            continue
        close = tokens.index(tok.token_to_id("</think>"))
        thought = tokens[len(plan.open_ids): close]
        assert len(thought) <= budget + 1  # the budget, then the forced "\n" before </think>
        if tuple(tokens[close - 1: close + 3]) == plan.close_ids:  # forced (the model may close by itself first)
            assert len(thought) - 1 == budget
        closed += 1
        if closed == 3:
            break
    assert closed == 3


def test_grammar_applies_after_thinking(qwen3_engine):
    tok = qwen3_engine.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(5):
        events = qwen3_engine.submit([5, 40, 100], SamplingParams(
            max_tokens=120, seed=seed, thinking=_plan(tok, 12), grammar=json_schema_grammar(schema))).result()[0]
        text = "".join(e.text for e in events)
        assert events[-1].finish_reason == "stop", text
        reasoning, content = split_all([text], False)
        jsonschema.validate(json.loads(content), schema)
        assert reasoning  # free noise inside the block


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    server, engine = start_tiny_server(tmp_path_factory.mktemp("qwen3_server"), model=TINY_QWEN3, max_len=512)
    yield server
    server.stop()
    engine.stop()


def test_reasoning_content_end_to_end(qwen3_server):
    client = openai.OpenAI(base_url=qwen3_server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    for seed in range(3):
        reply = client.chat.completions.create(model=TINY_ID, messages=messages, seed=seed, max_tokens=60,
                                               reasoning_effort="low")
        message = reply.model_dump()["choices"][0]["message"]
        assert message["reasoning_content"]  # forced open, budget 30 = min(512, 60 // 2), forced close
        assert "<think>" not in message["content"] and "</think>" not in message["content"]
        stream = client.chat.completions.create(model=TINY_ID, messages=messages, seed=seed, max_tokens=60,
                                                reasoning_effort="low", stream=True)
        reasoning, content = "", ""
        for chunk in stream:
            for choice in chunk.model_dump()["choices"]:
                reasoning += choice["delta"].get("reasoning_content") or ""
                content += choice["delta"].get("content") or ""
        assert (reasoning, content) == (message["reasoning_content"], message["content"])
    off = client.chat.completions.create(model=TINY_ID, messages=messages, seed=0, max_tokens=20,
                                         reasoning_effort="minimal").model_dump()["choices"][0]["message"]
    assert off["reasoning_content"] is None and off["content"]


def test_json_schema_with_thinking_end_to_end(qwen3_server):
    client = openai.OpenAI(base_url=qwen3_server.url + "/v1", api_key="unused", max_retries=0)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    for seed in range(5):
        reply = client.chat.completions.create(
            model=TINY_ID, messages=[{"role": "user", "content": "ok?"}], seed=seed, max_tokens=80,
            reasoning_effort="low", response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        message = reply.model_dump()["choices"][0]["message"]
        assert reply.choices[0].finish_reason == "stop" and message["reasoning_content"]
        jsonschema.validate(json.loads(message["content"]), schema)


def test_effort_has_no_effect_on_models_that_do_not_think(tmp_path):
    server, engine = start_tiny_server(tmp_path, max_len=256)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        plain = client.chat.completions.create(model=TINY_ID, messages=messages, seed=3, max_tokens=12)
        for effort in ("minimal", "low", "high"):
            reply = client.chat.completions.create(model=TINY_ID, messages=messages, seed=3, max_tokens=12,
                                                   reasoning_effort=effort)
            assert reply.choices[0].message.content == plain.choices[0].message.content
            assert "reasoning_content" not in reply.choices[0].message.model_dump()
    finally:
        server.stop()
        engine.stop()
