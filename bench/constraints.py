"""Throughput cost of grammar constraints, and where the host time goes.

Usage: FLAXCHAT_HOME=... .venv/bin/python bench/constraints.py
Default model, 8-slot engine, 8 concurrent requests of up to 96 tokens, temperature 0.8; medians of 3 runs:
all free, all JSON-schema constrained, and a mixed batch (4 + 4, the same batch) whose two halves are
reported separately. Also: host time spent computing masks per decode step (engine.stats["mask_ns"]) against
the whole step, and llguidance's mask + advance per token on its own.
"""

from __future__ import annotations

import json
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
    from flaxchat.checkpoints.store import load_model, pull
    from flaxchat.sampling.constraints import TokenConstraint, json_schema_grammar, ll_tokenizer
    from flaxchat.sampling.engine import Engine, EngineConfig
    from flaxchat.sampling.params import SamplingParams
    from flaxchat.sampling.params import bitmask_words
    from flaxchat.chat.template import render_chat

    pull(progress=False)
    model = load_model("smollm2-135m-instruct")
    prompt = model.tokenizer.encode(render_chat(
        model.chat_template, [{"role": "user", "content": "Describe a famous film as JSON."}],
        special_tokens={"bos_token": model.tokenizer.special.bos_token}))
    grammar = json_schema_grammar(SCHEMA)
    engine = Engine(model.cfg, model.params, model.tokenizer, EngineConfig(slots=8, max_len=512)).start()

    def run(kinds: list[bool]) -> dict[str, float]:
        """Tokens/s for the constrained and the free requests of one batch, plus mask ms per step."""
        before = dict(engine.stats)
        started = time.perf_counter()
        handles = [(c, engine.submit(prompt, SamplingParams(max_tokens=96, temperature=0.8, seed=i,
                                                            grammar=grammar if c else None)))
                   for i, c in enumerate(kinds)]
        done = {True: [], False: []}
        for constrained, handle in handles:
            events = handle.result()[0]
            done[constrained].append((len(events), time.perf_counter()))
        elapsed = time.perf_counter() - started
        steps = engine.stats["decode_calls"] - before.get("decode_calls", 0)
        out = {"mask_ms_per_step": (engine.stats["mask_ns"] - before.get("mask_ns", 0)) / 1e6 / max(steps, 1),
               "step_ms": elapsed * 1000 / max(steps, 1)}
        for constrained, name in ((True, "constrained"), (False, "free")):
            if done[constrained]:
                out[name] = sum(n for n, _ in done[constrained]) / elapsed
        return out

    batches = {"free": [False] * 8, "constrained": [True] * 8, "mixed": [True, False] * 4}
    for kinds in batches.values():
        run(kinds)  # warm
    results = {name: [run(kinds) for _ in range(3)] for name, kinds in batches.items()}
    engine.stop()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    constraint = TokenConstraint(ll_tokenizer(model.tokenizer, model.cfg.vocab_size), grammar,
                                 bitmask_words(model.cfg.vocab_size))
    sample = {"title": "Casablanca", "year": 1942, "genres": ["drama", "romance"],
              "summary": "In wartime Morocco an exiled American meets his old love."}
    text_ids = model.tokenizer.encode(json.dumps(sample, separators=(",", ":")))  # the grammar's compact form
    started = time.perf_counter()
    for token in text_ids:
        constraint.allowed()
        constraint.advance(token)
    per_token_ms = (time.perf_counter() - started) / len(text_ids) * 1000

    free = median("free", "free")
    print("| 8 concurrent requests, SmolLM2-135M, 8-slot engine | tokens/s | vs all free | mask ms / step | step ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| all free | {free:.1f} | 1.00x | {median('free', 'mask_ms_per_step'):.2f} | {median('free', 'step_ms'):.1f} |")
    c = median("constrained", "constrained")
    print(f"| all JSON-schema constrained | {c:.1f} | {c / free:.2f}x | "
          f"{median('constrained', 'mask_ms_per_step'):.2f} | {median('constrained', 'step_ms'):.1f} |")
    mc, mf = median("mixed", "constrained"), median("mixed", "free")
    print(f"| mixed batch (4 + 4): both halves | {mc + mf:.1f} | {(mc + mf) / free:.2f}x | "
          f"{median('mixed', 'mask_ms_per_step'):.2f} | {median('mixed', 'step_ms'):.1f} |")
    print(f"| mixed batch: constrained half / free half | {mc:.1f} / {mf:.1f} | | | |")
    print()
    print(f"llguidance mask + advance on its own: {per_token_ms:.3f} ms per token per sequence")


if __name__ == "__main__":
    main()
