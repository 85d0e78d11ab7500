"""Throughput cost of grammar constraints: the same batch with and without a JSON-schema constraint.

Usage: FLAXCHAT_HOME=... .venv/bin/python bench/constraints.py
Default model, 8-slot engine, 8 concurrent requests of up to 96 tokens, temperature 0.8; medians of 3.
Also times llguidance's mask computation per token on its own.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                           "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
                                           "genres": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                      "minItems": 1, "maxItems": 4},
                                           "summary": {"type": "string"}},
          "required": ["title", "year", "genres", "summary"], "additionalProperties": False}


def main() -> None:
    from checkpoints.store import load_model, pull
    from sampling.constraints import TokenConstraint, json_schema_grammar, ll_tokenizer
    from sampling.engine import Engine, EngineConfig
    from sampling.params import SamplingParams
    from sampling.steps import bitmask_words
    from serve.chat_template import render_chat

    pull(progress=False)
    model = load_model("smollm2-135m-instruct")
    prompt = model.tokenizer.encode(render_chat(
        model.chat_template, [{"role": "user", "content": "Describe a famous film as JSON."}],
        special_tokens={"bos_token": model.tokenizer.special.bos_token}))
    grammar = json_schema_grammar(SCHEMA)
    engine = Engine(model.cfg, model.params, model.tokenizer, EngineConfig(slots=8, max_len=512)).start()

    def run(constrained: bool) -> float:
        started = time.perf_counter()
        handles = [engine.submit(prompt, SamplingParams(max_tokens=96, temperature=0.8, seed=i,
                                                        grammar=grammar if constrained else None))
                   for i in range(8)]
        tokens = sum(len(h.result()[0]) for h in handles)
        return tokens / (time.perf_counter() - started)

    run(False), run(True)
    free = statistics.median(run(False) for _ in range(3))
    constrained = statistics.median(run(True) for _ in range(3))
    engine.stop()

    constraint = TokenConstraint(ll_tokenizer(model.tokenizer, model.cfg.vocab_size), grammar,
                                 bitmask_words(model.cfg.vocab_size))
    import json

    sample = {"title": "Casablanca", "year": 1942, "genres": ["drama", "romance"],
              "summary": "In wartime Morocco an exiled American meets his old love."}
    text_ids = model.tokenizer.encode(json.dumps(sample, separators=(",", ":")))  # the grammar's compact form
    started = time.perf_counter()
    for token in text_ids:
        constraint.allowed()
        constraint.advance(token)
    per_token_ms = (time.perf_counter() - started) / len(text_ids) * 1000

    print("| 8 concurrent requests, SmolLM2-135M, 8-slot engine | tokens/s |")
    print("| --- | ---: |")
    print(f"| unconstrained | {free:.1f} |")
    print(f"| JSON-schema constrained | {constrained:.1f} ({constrained / free:.2f}x) |")
    print()
    print(f"llguidance mask + advance: {per_token_ms:.3f} ms per token per sequence (computed on the host, "
          f"before each decode step)")


if __name__ == "__main__":
    main()
