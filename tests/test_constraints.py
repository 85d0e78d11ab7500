"""Grammar-constrained decoding in the engine (llguidance masks), on a tiny random model whose free output is noise."""

import json

import jsonschema
import pytest

from sampling.constraints import ConstraintError, json_schema_grammar
from sampling.engine import collect_text
from sampling.params import SamplingParams
from tests.engine_fixtures import tiny_engine

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
    engine = tiny_engine(tmp_path_factory.mktemp("constrained"), max_len=256)
    yield engine
    engine.stop()


def test_schema_output_always_validates(engine):
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(20):
        events = engine.submit([5, 40, 300, 17], SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                                                                grammar=grammar)).result()[0]
        assert events[-1].finish_reason == "stop", f"seed {seed}: {collect_text(events)!r}"
        jsonschema.validate(json.loads(collect_text(events)), SCHEMA)


def test_json_object_stops_only_on_complete_json(engine):
    grammar = json_schema_grammar({"type": "object"})
    finished = 0
    for seed in range(30):
        events = engine.submit([5, 40, 300, 17], SamplingParams(max_tokens=60, temperature=1.0, seed=seed,
                                                                grammar=grammar)).result()[0]
        text = collect_text(events)
        assert events[-1].finish_reason in ("stop", "length")
        if events[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
        else:
            assert text.lstrip().startswith("{")  # a prefix of an object, cut by max_tokens (as OpenAI does)
    assert finished >= 5


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
