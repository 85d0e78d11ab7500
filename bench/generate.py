"""Batch-1 greedy decode speed of flaxchat's first generation path vs transformers, same machine, same run.

Usage: .venv/bin/python bench/generate.py [--tokens 128] [--repeats 3]
Needs the default model in the store (`flaxchat pull`) and the dev extra (torch, transformers).
Reports the median of ``--repeats`` runs of each; prints a Markdown table with ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from flaxchat.checkpoints.store import load_model, pull
    from flaxchat.sampling.generate import GenerationSettings, SimpleGenerator
    from flaxchat.serve.chat_template import render_chat
    from tests.default_model import download_default_gguf

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    pull(progress=False)
    model = load_model("smollm2-135m-instruct")
    text = render_chat(model.chat_template, [{"role": "user", "content": PROMPT}],
                       special_tokens={"bos_token": model.tokenizer.special.bos_token})
    ids = model.tokenizer.encode(text)
    settings = GenerationSettings(max_tokens=args.tokens)  # no stop ids: always args.tokens tokens

    generator = SimpleGenerator(model.cfg, model.params)
    started = time.perf_counter()
    list(generator.generate(ids, GenerationSettings(max_tokens=2)))
    compile_s = time.perf_counter() - started

    def ours() -> float:
        started = time.perf_counter()
        out = list(generator.generate(ids, settings))
        assert len(out) == args.tokens
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = download_default_gguf(Path(tmp))
        reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32).eval()

    def theirs() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                     do_sample=False, pad_token_id=0)
        assert out.shape[1] - len(ids) == args.tokens
        return time.perf_counter() - started

    theirs()  # warm-up
    ours_s = statistics.median(ours() for _ in range(args.repeats))
    theirs_s = statistics.median(theirs() for _ in range(args.repeats))
    ours_tps, theirs_tps = args.tokens / ours_s, args.tokens / theirs_s
    print(f"machine: {platform.processor() or platform.machine()}, {threads} cores, jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), prompt {len(ids)} tokens, "
          f"{args.tokens} new tokens, batch 1, greedy, median of {args.repeats}")
    print()
    print("| engine | tokens/s (prefill + decode) | ratio vs transformers |")
    print("| --- | ---: | ---: |")
    print(f"| flaxchat SimpleGenerator | {ours_tps:.1f} | {ours_tps / theirs_tps:.2f}x |")
    print(f"| transformers generate | {theirs_tps:.1f} | 1.00x |")
    print()
    print(f"flaxchat first call (compile prefill bucket + decode step): {compile_s:.1f}s")


if __name__ == "__main__":
    main()
