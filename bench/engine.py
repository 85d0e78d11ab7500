"""Engine throughput, latency, warm-up and memory vs transformers' generate, same machine, same run.

Usage: FLAXCHAT_HOME=... .venv/bin/python bench/engine.py [--new-tokens 128] [--out bench/RESULTS.md]
Each side runs in its own subprocess (so peak memory is its own), float32, with the machine's cores as
threads. Both sample with temperature 0.8 and always generate ``--new-tokens`` tokens (EOS ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 4, 8, 16)
QUESTION = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def prompt_of_length(tokenizer, n: int) -> list[int]:
    """A chat prompt padded with filler text to exactly ``n`` tokens."""
    filler = tokenizer.encode(" The quick brown fox jumps over the lazy dog." * (n // 4 + 8))
    base = tokenizer.encode("<|im_start|>user\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    return (filler[: max(0, n - len(base))] + base)[-n:]


def median_of_3(measure, *args) -> float:
    """This machine is a shared VM: single runs vary by up to ~30%, so every figure is a median of three."""
    return sorted(measure(*args) for _ in range(3))[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_flaxchat(new_tokens: int) -> dict:
    from flaxchat.checkpoints.store import load_model, pull
    from flaxchat.sampling.engine import Engine, EngineConfig
    from flaxchat.sampling.params import SamplingParams

    pull(progress=False)
    model = load_model("smollm2-135m-instruct")
    prompt = prompt_of_length(model.tokenizer, 32)
    results = {}

    def batch(n: int) -> float:
        started = time.perf_counter()
        handles = [engine.submit(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=i,
                                                        ignore_eos=True)) for i in range(n)]
        total = sum(len(h.result()[0]) for h in handles)
        assert total == n * new_tokens
        return total / (time.perf_counter() - started)

    # A deployment sized for one user first: the engine with a single slot.
    engine = Engine(model.cfg, model.params, model.tokenizer, EngineConfig(slots=1, max_len=1024)).start()
    batch(1)
    results["single_slot_tokens_per_s"] = median_of_3(batch, 1)
    engine.stop()

    engine = Engine(model.cfg, model.params, model.tokenizer, EngineConfig(slots=16, max_len=1024, queue_size=64))
    engine.start()
    results.update(warmup_s=engine.warmup_seconds, compiles_after_warmup=engine.compile_count)
    batch(2)  # settle
    results["tokens_per_s"] = {n: median_of_3(batch, n) for n in CONCURRENCY}
    for n in (32, 512):
        long_prompt = prompt_of_length(model.tokenizer, n)
        times = []
        for i in range(3):
            started = time.perf_counter()
            handle = engine.submit(long_prompt, SamplingParams(max_tokens=1, seed=i))
            next(iter(handle))
            times.append(time.perf_counter() - started)
            handle.result()
        results[f"ttft_{n}_s"] = sorted(times)[1]
    results["compiles_after_serving"] = engine.compile_count
    engine.stop()
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def run_transformers(new_tokens: int, gguf_dir: str, gguf_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    results = {"warmup_s": time.perf_counter() - started}

    class Wrap:  # prompt_of_length needs encode() without special handling
        def encode(self, text):
            return tokenizer.encode(text, add_special_tokens=False)

    prompt = prompt_of_length(Wrap(), 32)

    def batch(n: int, tokens: int = new_tokens) -> float:
        ids = torch.tensor([prompt] * n)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
                                 pad_token_id=0)
        assert out.shape[1] - len(prompt) == tokens
        return n * tokens / (time.perf_counter() - started)

    batch(2, 8)
    results["tokens_per_s"] = {n: median_of_3(batch, n) for n in CONCURRENCY}
    for n in (32, 512):
        ids = torch.tensor([prompt_of_length(Wrap(), n)])
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               pad_token_id=0)
            times.append(time.perf_counter() - started)
        results[f"ttft_{n}_s"] = sorted(times)[1]
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def child(args: argparse.Namespace) -> None:
    if args.side == "flaxchat":
        result = run_flaxchat(args.new_tokens)
    else:
        result = run_transformers(args.new_tokens, args.gguf_dir, args.gguf_name)
    print("RESULT " + json.dumps(result))


def spawn(side: str, args: argparse.Namespace, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--side", side, "--new-tokens", str(args.new_tokens), *extra]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["flaxchat", "transformers"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gguf-dir")
    parser.add_argument("--gguf-name")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    import tempfile

    import jax
    import torch

    from tests.default_model import download_default_gguf

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = download_default_gguf(Path(tmp))
        theirs = spawn("transformers", args, ["--gguf-dir", str(gguf_path.parent), "--gguf-name", gguf_path.name])
    ours = spawn("flaxchat", args, [])

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"jax {jax.__version__} (XLA:CPU), torch {torch.__version__} with {os.cpu_count()} threads; float32 both.",
        f"Model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32). Each request: 32-token prompt, "
        f"{args.new_tokens} sampled tokens (temperature 0.8, EOS ignored). flaxchat engine: 16 slots, "
        f"1024-position cache, 1 decode step per call. transformers: `generate` on a batch of the same size.",
        "",
        "| measure | flaxchat | transformers | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for n in CONCURRENCY:
        a, b = ours["tokens_per_s"][str(n)], theirs["tokens_per_s"][str(n)]
        label = "decode tokens/s, 1 request, engine with 16 slots" if n == 1 else f"aggregate tokens/s, {n} concurrent requests"
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    for n in (32, 512):
        a, b = ours[f"ttft_{n}_s"], theirs[f"ttft_{n}_s"]
        lines.append(f"| time to first token, {n}-token prompt (s) | {a:.3f} | {b:.3f} | {b / a:.2f}x faster |")
    single = ours["single_slot_tokens_per_s"]
    lines.append(f"| decode tokens/s, 1 request, engine with 1 slot | {single:.1f} | {theirs['tokens_per_s']['1']:.1f} "
                 f"| {single / theirs['tokens_per_s']['1']:.2f}x |")
    lines.append(f"| start-up: warm-up compile / model load (s) | {ours['warmup_s']:.1f} | {theirs['warmup_s']:.1f} | |")
    lines.append(f"| peak resident memory (MB) | {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | |")
    lines.append("")
    lines.append(f"flaxchat compiles: {ours['compiles_after_warmup']} at warm-up, "
                 f"{ours['compiles_after_serving']} after serving everything above.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
