"""``flaxchat bench``: how fast a server answers, measured through HTTP as a user would see it.

Two probes, the same as the project's measuring stick (``../shared/tools/load_probe.py`` and
``prefix_probe.py``, whose prompts and method they repeat): streaming load at 1/4/8/16 concurrent clients
(64 tokens each, temperature 0.7: aggregate tok/s and p50 time to first token) and prompt reuse (a short
prompt, a long conversation's first and next turn, 16 clients sharing a system prompt or not). The server is
a URL, or ``flaxchat serve`` started for the run in a process of its own (so the clients do not share its
interpreter). Results: a markdown table on stdout, JSON (the ``bench/results/*.json`` shape, one run) and a
PNG plot.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

LEVELS = (1, 4, 8, 16)
WORDS = ("river stone lantern orchard meadow copper harbor violet thunder pepper glacier saddle "
         "compass marble falcon willow ember canyon quartz tide").split()


@dataclass(frozen=True)
class LoadPoint:
    clients: int
    tok_s: float  # completion tokens of all clients / wall time
    p50_ttft_ms: float
    failed: int


@dataclass(frozen=True)
class PrefixPoint:
    short_ms: float
    first_turn_ms: float
    next_turn_ms: float
    shared_p50_ms: float
    distinct_p50_ms: float


def _model(base: str) -> str:
    return httpx.get(f"{base}/models", timeout=30).json()["data"][0]["id"]


def _stream(base: str, body: dict) -> tuple[float, int, str]:
    """(seconds to the first content, completion tokens, text) of one streamed chat completion."""
    started, first, tokens, text = time.perf_counter(), None, 0, []
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                first = first or time.perf_counter() - started
                text.append(choices[0]["delta"]["content"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else float("nan")), tokens or len(text), "".join(text)


def load_probe(base: str, levels: tuple[int, ...] = LEVELS, max_tokens: int = 64) -> list[LoadPoint]:
    """At each level, 2 x clients streaming requests from that many concurrent clients."""
    model = _model(base)

    def one(i: int) -> tuple[int, float, int]:
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                "messages": [{"role": "user", "content": f"Write a story about robot number {i}."}],
                "stream_options": {"include_usage": True}}
        try:
            ttft, tokens, _ = _stream(base, body)
            return tokens, ttft, 0
        except httpx.HTTPError:
            return 0, float("nan"), 1

    points = []
    for clients in levels:
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(clients * 2)))
        elapsed = time.perf_counter() - started
        ttfts = [r[1] for r in results if r[1] == r[1]] or [float("nan")]
        points.append(LoadPoint(clients, sum(r[0] for r in results) / elapsed, statistics.median(ttfts) * 1000,
                                sum(r[2] for r in results)))
    return points


def _words(count: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(count))


def prefix_probe(base: str, history_words: int = 900, crowd_words: int = 700) -> PrefixPoint:
    """Time to first token (temperature 0, 16 tokens): a short prompt (median of 3, after one to warm), a
    long conversation's first turn and its next turn, and the p50 of 16 concurrent clients whose ~1,000-token
    system prompts are shared (after one warming crowd) or distinct."""
    model = _model(base)

    def ttft(messages: list[dict]) -> tuple[float, str]:
        first, _, text = _stream(base, {"model": model, "messages": messages, "stream": True, "max_tokens": 16,
                                        "temperature": 0})
        return first, text

    short = [{"role": "user", "content": "Name a colour."}]
    ttft(short)
    short_s = statistics.median(ttft(short)[0] for _ in range(3))
    history = [{"role": "system", "content": "You are a terse assistant. Notes: " + _words(history_words)},
               {"role": "user", "content": "Summarise the notes in five words."}]
    first_s, reply = ttft(history)
    next_s = ttft(history + [{"role": "assistant", "content": reply or "ok"},
                             {"role": "user", "content": "Now name one word from the notes."}])[0]

    def crowd(shared: bool) -> float:
        def one(i: int) -> float:
            notes = _words(crowd_words) if shared else _words(crowd_words, salt=i + 1)
            return ttft([{"role": "system", "content": "You are a terse assistant. Notes: " + notes},
                         {"role": "user", "content": f"Question {i}: name one word from the notes."}])[0]

        with cf.ThreadPoolExecutor(16) as pool:
            return statistics.median(pool.map(one, range(16)))

    crowd(True)  # lets a prefix cache learn the shared prompt, as a live server would
    shared_s = crowd(True)
    distinct_s = crowd(False)
    return PrefixPoint(short_s * 1000, first_s * 1000, next_s * 1000, shared_s * 1000, distinct_s * 1000)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def started_server(model: str, serve_args: list[str], log: Path | None = None,
                   timeout: float = 900) -> Iterator[str]:
    """``flaxchat serve MODEL ARGS`` on a free loopback port until the block ends; yields its ``/v1`` URL."""
    port = _free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "flaxchat.cli", "serve", model, "--port", str(port),
                                *serve_args], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"flaxchat serve exited with status {process.returncode}"
                                   + (f" (log: {log})" if log else ""))
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"flaxchat serve not ready after {timeout:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            out.close()


def run(base: str, name: str = "flaxchat", probes: tuple[str, ...] = ("load", "prefix"),
        levels: tuple[int, ...] = LEVELS, prefix_words: tuple[int, int] = (900, 700)) -> dict[str, Any]:
    """One server's figures as a ``bench/results`` run: ``{"load": {...}, "prefix": {...}}``."""
    result: dict[str, Any] = {}
    if "load" in probes:
        points = load_probe(base, levels)
        result["load"] = {"clients": [p.clients for p in points],
                          name: {"tok_s": [round(p.tok_s, 1) for p in points],
                                 "p50_ttft_ms": [round(p.p50_ttft_ms) for p in points],
                                 "failed": [p.failed for p in points]}}
    if "prefix" in probes:
        result["prefix"] = {name: {k: round(v) for k, v in asdict(prefix_probe(base, *prefix_words)).items()}}
    return result


def markdown(run_result: dict[str, Any]) -> str:
    """The run's tables (every server in it side by side)."""
    lines = []
    if "load" in run_result:
        load = run_result["load"]
        servers = [k for k in load if k != "clients"]
        lines += ["| clients | " + " | ".join(f"{s} tok/s | {s} p50 TTFT ms" for s in servers) + " |",
                  "| ---: |" + " ---: | ---: |" * len(servers)]
        for i, clients in enumerate(load["clients"]):
            lines.append(f"| {clients} | " + " | ".join(f"{load[s]['tok_s'][i] if 'tok_s' in load[s] else '-'} | "
                                                          f"{load[s]['p50_ttft_ms'][i]}" for s in servers) + " |")
        lines.append("")
    if "prefix" in run_result:
        prefix = run_result["prefix"]
        servers = list(prefix)
        lines += ["| probe (TTFT ms) | " + " | ".join(servers) + " |", "| --- |" + " ---: |" * len(servers)]
        for key, label in (("short_ms", "short prompt"), ("first_turn_ms", "long conversation, first turn"),
                           ("next_turn_ms", "its next turn"), ("shared_p50_ms", "16 clients, shared prompt, p50"),
                           ("distinct_p50_ms", "16 clients, distinct prompts, p50")):
            lines.append(f"| {label} | " + " | ".join(str(prefix[s][key]) for s in servers) + " |")
    return "\n".join(lines)


def plot(run_result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Throughput and p50 TTFT against concurrent clients (and the prefix probe's TTFTs) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("load", "prefix") if k in run_result]
    fig, axes = plt.subplots(1, len(panels) + ("load" in panels), figsize=(5 * (len(panels) + 1), 3.6), squeeze=False)
    axes = list(axes[0])
    if "load" in run_result:
        load, (speed, ttft) = run_result["load"], axes[:2]
        axes = axes[2:]
        for server in (k for k in load if k != "clients"):
            if "tok_s" in load[server]:  # (a client-only floor has TTFTs but no throughput worth plotting)
                speed.plot(load["clients"], load[server]["tok_s"], "o-", label=server)
            ttft.plot(load["clients"], load[server]["p50_ttft_ms"], "o-", label=server)
        speed.set(xlabel="concurrent streaming clients", ylabel="tokens / s, all clients", xscale="log")
        ttft.set(xlabel="concurrent streaming clients", ylabel="p50 time to first token, ms", xscale="log")
        for ax in (speed, ttft):
            ax.set_xticks(load["clients"], labels=[str(c) for c in load["clients"]])
        speed.legend()
        ttft.legend()
    if "prefix" in run_result:
        prefix, ax = run_result["prefix"], axes[0]
        keys = ["short_ms", "next_turn_ms", "shared_p50_ms"]
        servers = list(prefix)
        width = 0.8 / len(servers)
        for j, server in enumerate(servers):
            ax.bar([i + (j - (len(servers) - 1) / 2) * width for i in range(len(keys))],
                   [prefix[server][k] for k in keys], width, label=server)
        ax.set_xticks(range(len(keys)), ["short", "next turn", "shared prompt\n(16 clients)"])
        ax.set(ylabel="time to first token, ms")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
