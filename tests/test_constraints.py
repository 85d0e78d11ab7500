"""Grammar-constrained decoding in the engine (llguidance masks), on a tiny random model whose free output is noise."""

import json

import jsonschema
import pytest

from flaxchat.sampling.constraints import ConstraintError, json_schema_grammar
from flaxchat.sampling.requests import collect_text
from flaxchat.sampling.params import SamplingParams
from tests.engine_fixtures import tiny_engine
from tests.json_schemas import SCHEMAS

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = tiny_engine(tmp_path_factory.mktemp("constrained"), max_len=256, slots=16, queue_size=256)
    yield engine
    engine.stop()


def test_schema_output_always_validates(engine):
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(20):
        events = engine.submit([5, 40, 300, 17], SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                                                                grammar=grammar)).result()[0]
        assert events[-1].finish_reason == "stop", f"seed {seed}: {collect_text(events)!r}"
        jsonschema.validate(json.loads(collect_text(events)), SCHEMA)


def test_json_object_always_parses_even_when_the_budget_runs_out(engine):
    """The tiny model's strings are noise that rarely closes: the end of the budget forces the closing."""
    grammar = json_schema_grammar({"type": "object"})
    handles = [engine.submit([5, 40, 300, 17], SamplingParams(max_tokens=60, seed=seed, grammar=grammar))
               for seed in range(50)]
    reasons = []
    for handle in handles:
        events = handle.result()[0]
        assert isinstance(json.loads(collect_text(events)), dict)
        assert len(events) <= 60
        reasons.append(events[-1].finish_reason)
    assert set(reasons) == {"stop", "length"}  # both happen: finished by the model, closed at the budget


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schemas_validate_for_20_seeds(engine, name):
    schema = SCHEMAS[name]
    grammar = json_schema_grammar(schema)
    handles = [engine.submit([9, 8, 7], SamplingParams(max_tokens=80, seed=seed, grammar=grammar))
               for seed in range(20)]
    for handle in handles:
        events = handle.result()[0]
        assert events[-1].finish_reason in ("stop", "length")
        jsonschema.validate(json.loads(collect_text(events)), schema)


def test_a_budget_too_small_to_close_ends_incomplete(engine):
    schema = SCHEMAS["nested"]  # needs {"user":{"name":"","age":0}} at least: more than 5 tokens
    events = engine.submit([9, 8, 7], SamplingParams(max_tokens=5, seed=0, grammar=json_schema_grammar(schema))).result()[0]
    assert events[-1].finish_reason == "length" and len(events) == 5
    with pytest.raises(ValueError):
        json.loads(collect_text(events))


def test_constrained_and_free_requests_share_the_batch_and_stay_reproducible(engine):
    grammar = json_schema_grammar(SCHEMA)
    constrained = SamplingParams(max_tokens=120, temperature=0.9, seed=42, grammar=grammar, logprobs=True)
    alone = engine.submit([7, 8, 9], constrained).result()[0]
    free = [engine.submit([3, 4, 5, 6], SamplingParams(max_tokens=40, temperature=1.0, seed=i, ignore_eos=True))
            for i in range(3)]
    together = engine.submit([7, 8, 9], constrained).result()[0]
    for handle in free:
        assert len(handle.result()[0]) == 40  # unconstrained rows are not masked
    assert [(e.token_id, e.logprob) for e in together] == [(e.token_id, e.logprob) for e in alone]


def test_invalid_grammar_is_refused_at_submit(engine):
    with pytest.raises(ConstraintError, match="nonsense"):
        engine.submit([5], SamplingParams(grammar=json_schema_grammar({"type": "nonsense"})))
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def test_the_way_out_of_a_long_number_in_a_short_array_is_found(engine):
    """Inside an integer of an array still short of minItems, "0" only lengthens the number: the closer
    must find ``,0]}`` (a reply like ``{"items":[368019153508...`` once ran out of budget unclosed)."""
    from flaxchat.sampling.closing import StringTracker, closing_path, vocab_facts
    from flaxchat.sampling.constraints import TokenConstraint, ll_tokenizer
    from flaxchat.sampling.params import bitmask_words

    vocab = engine.cfg.vocab_size
    constraint = TokenConstraint(ll_tokenizer(engine.tokenizer, vocab), json_schema_grammar(SCHEMAS["array_bounds"]),
                                 bitmask_words(vocab))
    facts, strings, prefix = vocab_facts(engine.tokenizer, vocab), StringTracker(), '{"items":[3680191535082119'
    for token in engine.tokenizer.encode(prefix):
        constraint.advance(token)
        strings.push(facts.token_bytes[token])
    path = closing_path(constraint.matcher, strings, facts, limit=12)
    assert path is not None
    text = prefix + engine.tokenizer.decode([t for t in path if t != facts.eos])
    jsonschema.validate(json.loads(text), SCHEMAS["array_bounds"])


def test_per_tokenizer_facts_go_with_their_tokenizer(engine):
    """The llguidance view and the vocabulary facts are built once per tokenizer object and vocabulary size
    and kept on the tokenizer, so they go with it (a cache keyed by id() grew without bound and could hand a
    new tokenizer that reuses a freed one's address the old one's facts)."""
    import gc
    import weakref

    from flaxchat.model.tokenizer import HFTokenizer
    from flaxchat.sampling.closing import vocab_facts
    from flaxchat.sampling.constraints import ll_tokenizer

    original, size = engine.tokenizer, engine.cfg.vocab_size
    assert ll_tokenizer(original, size) is ll_tokenizer(original, size)
    assert vocab_facts(original, size) is vocab_facts(original, size)
    assert vocab_facts(original, size - 1) is not vocab_facts(original, size)
    copy = HFTokenizer.from_json(original.backend.to_str(), original.special)
    assert ll_tokenizer(copy, size) is not ll_tokenizer(original, size)
    facts, gone = weakref.ref(vocab_facts(copy, size)), weakref.ref(copy)
    del copy
    gc.collect()
    assert gone() is None and facts() is None


def _byte_matcher_accepts(grammar: str, text: str) -> bool:
    """Whether ``grammar`` accepts ``text`` (a byte-level tokenizer: one token per byte)."""
    import llguidance

    class Bytes:
        eos_token_id, bos_token_id = 256, None
        tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
        special_token_ids = [256]

        def __call__(self, text):
            return list(text.encode())

    matcher = llguidance.LLMatcher(llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes())), grammar)
    return all(matcher.consume_token(b) for b in text.encode()) and matcher.is_accepting()


def test_unbounded_integers_are_held_to_16_digits_and_given_bounds_kept():
    from flaxchat.sampling.constraints import LARGEST_INTEGER, bounded_numbers, json_schema_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": ["number", "null"]},
                                               "k": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "list": {"type": "array", "items": {"type": "integer"}}},
              "required": ["n"], "additionalProperties": False}
    bounded = bounded_numbers(schema)["properties"]
    assert (bounded["n"]["minimum"], bounded["n"]["maximum"]) == (-LARGEST_INTEGER, LARGEST_INTEGER)
    assert bounded["k"] == {"type": "integer", "minimum": 0, "maximum": 9}
    assert bounded["list"]["items"]["maximum"] == LARGEST_INTEGER and bounded["x"]["maximum"] == 1e15
    grammar = json_schema_grammar(schema)
    assert _byte_matcher_accepts(grammar, '{"n":9007199254740991}')
    assert not _byte_matcher_accepts(grammar, '{"n":' + "9" * 17 + "}")
    assert not _byte_matcher_accepts(grammar, '{"n":1,"k":10}')
    assert _byte_matcher_accepts(grammar, '{"n":-12,"x":2.5,"list":[1,2]}')
