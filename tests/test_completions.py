"""``POST /v1/completions`` (legacy text completions) through the official client: the same engine and
seeds as the chat endpoint, several prompts and choices, streaming, logprobs, echo, and what is refused."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server_fixtures import TINY_ID, openai_client, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("completions"), slots=4, max_len=256)


@pytest.fixture
def client(server):
    return openai_client(server)


def test_seeded_text_completion_streams_the_same_text(client):
    first = client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=8, seed=3, temperature=0.9)
    again = client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=8, seed=3, temperature=0.9)
    assert first.object == "text_completion" and first.model == TINY_ID
    assert first.choices[0].text == again.choices[0].text and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 8 and first.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=8, seed=3, temperature=0.9,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == first.choices[0].text
    assert chunks[-1].choices[0].finish_reason == first.choices[0].finish_reason


def test_several_prompts_and_choices_each_as_if_alone(client):
    both = client.completions.create(model=TINY_ID, prompt=["the heat", "a cold"], n=2, max_tokens=6, seed=11)
    assert sorted(c.index for c in both.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in both.choices}
    for k, prompt in enumerate(["the heat", "a cold"]):
        alone = client.completions.create(model=TINY_ID, prompt=prompt, n=2, max_tokens=6, seed=11)
        assert [c.text for c in sorted(alone.choices, key=lambda c: c.index)] == [by_index[2 * k], by_index[2 * k + 1]]
    streamed = list(client.completions.create(model=TINY_ID, prompt=["the heat", "a cold"], n=2, max_tokens=6,
                                              seed=11, stream=True))
    for index, text in by_index.items():
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == index) == text


def test_logprobs_token_ids_and_echo(client, server):
    reply = client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=5, seed=2, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and all(lp <= 0 for lp in logprobs.token_logprobs)
    # one entry per sampled token (a stop token has none); special tokens are listed but not in the text
    assert len(logprobs.tokens) in (reply.usage.completion_tokens, reply.usage.completion_tokens - 1)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    ids = httpx.post(server.url + "/tokenize", json={"content": "the heat"}).json()["tokens"]
    by_ids = client.completions.create(model=TINY_ID, prompt=ids, max_tokens=5, seed=2)
    assert by_ids.choices[0].text == reply.choices[0].text
    echoed = client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=5, seed=2, echo=True)
    assert echoed.choices[0].text == "the heat" + reply.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_harnesses_ask(client, server):
    """``echo=True, logprobs=1``: the prompt's tokens come first with their log-probabilities (the first one
    none), then the completion's; ``max_tokens=0`` scores the prompt alone; streamed = whole; the reply is the
    one without echo."""
    plain = client.completions.create(model=TINY_ID, prompt="the heat is on", max_tokens=4, seed=6, logprobs=1)
    ids = httpx.post(server.url + "/tokenize", json={"content": "the heat is on"}).json()["tokens"]
    scored = client.completions.create(model=TINY_ID, prompt="the heat is on", max_tokens=4, seed=6, logprobs=1,
                                       echo=True)
    choice = scored.choices[0]
    assert choice.text == "the heat is on" + plain.choices[0].text
    lp, generated = choice.logprobs, plain.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + len(generated.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert lp.tokens[len(ids):] == generated.tokens and lp.token_logprobs[len(ids):] == generated.token_logprobs
    assert "".join(lp.tokens[: len(ids)]) == "the heat is on" and lp.text_offset == sorted(lp.text_offset)
    # a top alternative is at least as likely as the token it stands beside
    assert all(max(top.values()) >= x - 1e-6 for top, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))

    alone = client.completions.create(model=TINY_ID, prompt="the heat is on", max_tokens=0, logprobs=0, echo=True)
    assert alone.choices[0].text == "the heat is on" and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]
    assert alone.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=TINY_ID, prompt="the heat is on", max_tokens=4, seed=6, logprobs=1,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs


def test_max_tokens_zero_needs_echo(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("extra, param", [({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of")])
def test_what_is_not_supported_is_refused_naming_the_field(client, extra, param):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model=TINY_ID, prompt="the heat", max_tokens=2, **extra)
    assert info.value.body["param"] == param


def test_prompt_token_ids_outside_the_vocabulary_are_a_clear_error(server):
    """(found by the fuzzer: such ids reached the content filter's decode first, a 500)"""
    for prompt in ([-5, 3], [10**15], [[1, 2], [99999999]]):
        reply = httpx.post(server.url + "/v1/completions", json={"model": TINY_ID, "prompt": prompt, "max_tokens": 2})
        assert reply.status_code in (400, 422) and reply.json()["error"]["param"] == "prompt", reply.text
