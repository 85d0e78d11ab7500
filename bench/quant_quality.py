"""What quantised weights and KV caches cost in quality: greedy agreement and log-likelihood against float32.

Usage: FLAXCHAT_HOME=... .venv/bin/python bench/quant_quality.py [--out FILE]
The default model, the six chat prompts of tests/test_default_model.py: do the first 16 greedy tokens of
``--weights int8``, ``--weights int4`` (with int8 or float prompt activations) and of int8/bfloat16 KV caches
equal float32's (float32 weights, activations and cache)? And the mean per-token log-likelihood of a fixed English passage under each. The speed issue's bar:
>= 5 of 6 prompts agree, log-likelihood moves < 2 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS = 16
PASSAGE = (
    "The lighthouse stood on a rock at the edge of the bay, and every evening the keeper climbed the narrow "
    "stairs to light the lamp. Ships passing in the night relied on its beam to find their way around the "
    "reef. In the morning he wrote the weather in a log book, cleaned the lens, and watched the fishing boats "
    "leave the harbour. Most days were quiet, but in winter the storms came in from the west, and the waves "
    "broke so high that spray reached the windows of the lantern room."
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()

    import jax.numpy as jnp
    import numpy as np

    from flaxchat.checkpoints.store import load_model, pull
    from flaxchat.model.transformer import Transformer, init_cache
    from flaxchat.sampling.engine import Engine, EngineConfig
    from flaxchat.sampling.params import SamplingParams
    from flaxchat.chat.template import render_chat
    from tests.test_default_model import PROMPTS

    pull(progress=False)
    models = {w: load_model("smollm2-135m-instruct", weights=w) for w in ("float32", "int8", "int4")}
    # (weights, KV cache storage, prompt activations) against float32 everywhere
    variants = {"int8": ("int8", "float32", "float32"), "int4": ("int4", "float32", "float32"),
                "int4, int8 prompt activations": ("int4", "float32", "int8"),
                "bfloat16 KV": ("float32", "bfloat16", "float32"), "int8 KV": ("float32", "int8", "float32"),
                "int4 + int8 KV (the default)": ("int4", "int8", "float32"),
                "int4 + int8 KV, int8 prompt activations": ("int4", "int8", "int8"),
                "int4 + bfloat16 KV": ("int4", "bfloat16", "float32"),
                "int4 + bfloat16 KV, int8 prompt activations": ("int4", "bfloat16", "int8")}
    tokenizer = models["float32"].tokenizer
    special = {"bos_token": tokenizer.special.bos_token, "eos_token": tokenizer.special.eos_token}

    def config(variant: tuple[str, str, str]):
        return models[variant[0]].cfg.replace(prompt_activations=variant[2])

    def greedy(variant: tuple[str, str, str]) -> dict[str, list[int]]:
        """Each prompt's greedy continuation through the engine (one slot, the variant's weights and KV)."""
        model = models[variant[0]]
        settings = EngineConfig(slots=1, max_len=128, kv_dtype=variant[1], prefix_cache_mb=0)
        continuations = {}
        with Engine(config(variant), model.params, tokenizer, settings) as engine:
            for prompt in PROMPTS:
                ids = tokenizer.encode(render_chat(model.chat_template, [{"role": "user", "content": prompt}],
                                                   special_tokens=special))
                events = engine.submit(ids, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True))
                continuations[prompt] = [e.token_id for e in events.result()[0]]
        return continuations

    def mean_log_likelihood(variant: tuple[str, str, str]) -> float:
        model = models[variant[0]]
        ids = tokenizer.encode(PASSAGE)
        logits, _ = Transformer(config(variant)).apply({"params": model.params}, jnp.asarray([ids]),
                                                 jnp.arange(len(ids))[None],
                                                 init_cache(model.cfg, 1, 128, variant[1]))
        logp = np.asarray(logits[0], np.float64)
        logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(-1, keepdims=True)
        return float(np.mean([logp[t, ids[t + 1]] for t in range(len(ids) - 1)]))

    reference = ("float32", "float32", "float32")
    base = greedy(reference)
    ll = {"float32": mean_log_likelihood(reference)} | {mode: mean_log_likelihood(v) for mode, v in variants.items()}
    lines = []
    for mode, variant in variants.items():
        rows, continuations = [], greedy(variant)
        for prompt in PROMPTS:
            quant = continuations[prompt]
            first_diff = next((i for i, (a, b) in enumerate(zip(base[prompt], quant)) if a != b), TOKENS)
            rows.append((prompt, first_diff, tokenizer.decode(base[prompt]), tokenizer.decode(quant)))
        agree = sum(1 for r in rows if r[1] == TOKENS)
        change = abs(ll[mode] - ll["float32"]) / abs(ll["float32"])
        lines += [
            f"**{mode}**: greedy continuations ({TOKENS} tokens) equal to float32's: **{agree} of {len(rows)}** "
            f"prompts (bar: >= 5 of 6).",
            "",
            f"| prompt | tokens equal before the first difference | float32 | {mode} |",
            "| --- | ---: | --- | --- |",
            *[f"| {p} | {d} | {b!r} | {q!r} |" for p, d, b, q in rows],
            "",
            f"Mean log-likelihood per token of a fixed {len(tokenizer.encode(PASSAGE))}-token passage: "
            f"float32 {ll['float32']:.4f}, {mode} {ll[mode]:.4f}: **{100 * change:.2f} %** change (bar: < 2 %).",
            "",
        ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
