"""Compiled steps stored on disk (sampling/executables.py): a restarted engine with the same configuration
traces and compiles nothing at warm-up and gives the same seeded tokens; another configuration or a
damaged entry never reuses a wrong program. Each engine runs in its own process, as a restarted server
does."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys
from pathlib import Path
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2] + "-jax")  # as the server runs: JAX's cache on too
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from sampling.engine import Engine, EngineConfig
from sampling.params import SamplingParams
from tests.engine_fixtures import tiny_model

folder, store, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg, params, tokenizer = tiny_model(Path(folder))
engine = Engine(cfg, params, tokenizer, EngineConfig(slots=2, max_len=64, executable_dir=store, **extra)).start()
traced = engine.compile_count
seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=41, ignore_eos=True, logprobs=True, top_logprobs=2)
events = engine.submit([5, 40, 300, 17, 17, 9] * 3, seeded).result()[0]
tokens = [[e.token_id, e.logprob, [[t.token_id, t.logprob] for t in e.top_logprobs]] for e in events]
store = engine.steps.executables
print(json.dumps({"traced": traced, "traced_serving": engine.compile_count - traced, "loaded": store.loaded,
                  "compiled": store.compiled, "tokens": tokens}))
engine.stop()
"""


def _run(tmp_path: Path, store: Path, **extra) -> dict:
    folder = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
    result = subprocess.run([sys.executable, "-c", RUN, str(folder), str(store), json.dumps(extra)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_restart_loads_every_step_and_other_configurations_or_damage_compile_anew(tmp_path):
    store = tmp_path / "executables"
    first = _run(tmp_path, store)
    assert first["traced"] > 0 and first["compiled"] > 0 and first["loaded"] == 0
    assert first["traced_serving"] == 0 and len(first["tokens"]) == 12
    entries = sorted(store.glob("*.executable"))
    assert len(entries) == first["compiled"]

    restart = _run(tmp_path, store)  # nothing traced, nothing compiled, the same tokens
    assert restart["traced"] == 0 and restart["traced_serving"] == 0
    assert restart["compiled"] == 0 and restart["loaded"] == len(entries)
    assert restart["tokens"] == first["tokens"]

    other = _run(tmp_path, store, prefix_cache_mb=0.5)  # another pool size: other programs, none reused
    assert other["loaded"] == 0 and other["compiled"] == first["compiled"]

    sorted(store.glob("decode1-*.executable"))[0].write_bytes(b"not an executable")
    damaged = _run(tmp_path, store)
    assert damaged["compiled"] == 1 and damaged["loaded"] == len(entries) - 1
    assert damaged["tokens"] == first["tokens"]
