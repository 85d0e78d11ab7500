"""A soak under mixed load: many concurrent clients for minutes against a fresh `flaxchat serve`.

Usage: python bench/soak.py [--clients 64] [--seconds 600] [--out FILE] [-- extra flaxchat serve arguments]

Each client loops until the time is up, picking one kind of request at random: streaming chat, `n` = 3,
forced tool calls, `json_schema` output, a ~1,000-token prompt, a stream it drops after three chunks, and a
malformed body. Reported: requests by kind and status (a 5xx, or a malformed body not refused with a 4xx, is a
failure), requests left without an answer (client timeout), p50/p99 latency, the server's resident memory
per minute and its growth after the first minute, compiled steps before and after (must not change), busy
slots once the clients stop (must be 0), and a seeded request asked now and then during the load, whose
reply must equal its reply asked alone before the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ROOT, free_port, wait_ready  # noqa: E402

WORDS = ("river stone lantern orchard meadow copper harbor violet thunder pepper glacier saddle compass marble "
         "falcon willow ember canyon quartz tide").split()
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}
LONG_WORDS = 700  # the long prompt's words (~1,000 tokens of the default model)
SEEDED = {"messages": [{"role": "user", "content": "Tell me about lighthouses."}], "max_tokens": 24,
          "temperature": 0.8, "seed": 7}


def body(kind: str, rng: random.Random, model: str) -> dict:
    ask = [{"role": "user", "content": f"Question {rng.randrange(10**6)}: say something about the sea."}]
    if kind == "stream" or kind == "disconnect":
        return {"model": model, "messages": ask, "max_tokens": 32, "stream": True, "temperature": 0.7}
    if kind == "n":
        return {"model": model, "messages": ask, "max_tokens": 16, "n": 3, "temperature": 0.9}
    if kind == "tools":
        return {"model": model, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 40,
                "tools": [WEATHER], "tool_choice": "required"}
    if kind == "json_schema":
        return {"model": model, "messages": ask, "max_tokens": 40, "response_format": PERSON}
    if kind == "long":
        notes = " ".join(rng.choice(WORDS) for _ in range(LONG_WORDS))
        return {"model": model, "messages": [{"role": "system", "content": "Notes: " + notes}] + ask, "max_tokens": 8}
    return {"model": model, "messages": ask, "temperature": "hot"}  # malformed


KINDS = ("stream", "stream", "n", "tools", "json_schema", "long", "disconnect", "malformed")


async def one(client: httpx.AsyncClient, url: str, kind: str, payload: dict) -> int:
    """The response status (after reading the whole stream unless the client drops it)."""
    if not payload.get("stream"):
        response = await client.post(url, json=payload)
        if response.status_code == 200 and kind == "json_schema":
            json.loads(response.json()["choices"][0]["message"]["content"])  # must parse
        return response.status_code
    async with client.stream("POST", url, json=payload) as response:
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data: ")
            if kind == "disconnect" and chunks == 3:
                break  # the client goes away mid-stream
        return response.status_code


async def soak(base: str, model: str, clients: int, seconds: float) -> dict:
    url = f"{base}/chat/completions"
    deadline = time.monotonic() + seconds
    statuses: Counter = Counter()
    latency: dict[str, list[float]] = defaultdict(list)
    seeded: list[str] = []
    unanswered = failures = 0

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal unanswered, failures
        rng = random.Random(index)
        while time.monotonic() < deadline:
            if index == 0 and rng.random() < 0.2:
                response = await client.post(url, json={"model": model, **SEEDED})
                seeded.append(response.json()["choices"][0]["message"]["content"])
                continue
            kind = rng.choice(KINDS)
            started = time.perf_counter()
            try:
                status = await one(client, url, kind, body(kind, rng, model))
            except httpx.TimeoutException:
                unanswered += 1
                continue
            except Exception:  # noqa: BLE001 - a broken reply (bad JSON, cut stream) is a failure
                failures += 1
                continue
            statuses[(kind, status)] += 1
            failures += status >= 500 or (kind == "malformed") != (400 <= status < 500)
            latency[kind].append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return {"statuses": statuses, "latency": latency, "seeded": seeded, "unanswered": unanswered, "failures": failures}


def metric(base: str, name: str) -> float:
    text = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=10).text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--out", default=None)
    parser.add_argument("serve_args", nargs="*", help="extra `flaxchat serve` arguments (after --)")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "flaxchat"), "serve", "--slots", "16", "--port", str(port),
                               *args.serve_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, server)
        model = httpx.get(f"{base}/models").json()["data"][0]["id"]
        alone = httpx.post(f"{base}/chat/completions", json={"model": model, **SEEDED}, timeout=60).json()
        alone_text = alone["choices"][0]["message"]["content"]
        compiles_before = metric(base, "flaxchat_compiles")
        memory: list[tuple[float, float]] = []

        async def run() -> dict:
            async def sample() -> None:
                started = time.monotonic()
                while True:
                    memory.append((time.monotonic() - started, rss_mb(server.pid)))
                    await asyncio.sleep(5)
            sampler = asyncio.create_task(sample())
            try:
                return await soak(base, model, args.clients, args.seconds)
            finally:
                sampler.cancel()

        result = asyncio.run(run())
        time.sleep(3)
        busy, compiles_after = metric(base, "flaxchat_busy_slots"), metric(base, "flaxchat_compiles")
    finally:
        server.terminate()
        server.wait(60)
    per_minute = defaultdict(float)
    for at, mb in memory:
        per_minute[int(at // 60)] = max(per_minute[int(at // 60)], mb)
    minutes = [per_minute[m] for m in sorted(per_minute)]
    growth = (minutes[-1] / minutes[0] - 1) * 100 if len(minutes) > 1 else 0.0
    all_latency = sorted(x for xs in result["latency"].values() for x in xs)
    by_kind = Counter()
    for (kind, _), count in result["statuses"].items():
        by_kind[kind] += count
    fivexx = sum(count for (_, status), count in result["statuses"].items() if status >= 500)
    lines = [
        f"Soak: {args.clients} clients for {args.seconds:.0f} s, `flaxchat serve --slots 16 {' '.join(args.serve_args)}`",
        "",
        f"- requests answered: {sum(by_kind.values())} ({', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))}); "
        f"5xx: {fivexx}; failures (5xx, malformed not refused, broken replies): {result['failures']}; "
        f"left without an answer: {result['unanswered']}",
        f"- latency p50 {statistics.median(all_latency) * 1000:.0f} ms, "
        f"p99 {all_latency[int(0.99 * (len(all_latency) - 1))] * 1000:.0f} ms (all kinds)",
        f"- resident memory, max per minute (MB): {', '.join(f'{mb:.0f}' for mb in minutes)}; growth after "
        f"minute 1: {growth:+.1f} %",
        f"- compiled steps {compiles_before:.0f} before, {compiles_after:.0f} after; busy slots at the end: {busy:.0f}",
        f"- seeded request during the load: {len(result['seeded'])} times, "
        f"{sum(text == alone_text for text in result['seeded'])} equal to its reply alone",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    ok = (fivexx == 0 and result["failures"] == 0 and result["unanswered"] == 0 and busy == 0
          and compiles_after == compiles_before and all(text == alone_text for text in result["seeded"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
