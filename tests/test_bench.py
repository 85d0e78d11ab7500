"""``flaxchat bench`` end to end: it starts ``flaxchat serve`` on a model file (imported into the store on
the way), runs both probes through HTTP, and writes the table, the JSON and a PNG."""

from __future__ import annotations

import json

import pytest

from flaxchat import bench
from flaxchat.cli import main
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXCHAT_HOME", str(tmp_path / "home"))
    hf = make_tiny_model("llama", tmp_path / "hf", max_position_embeddings=1024)
    return write_gguf(hf, tmp_path / "bench-tiny.gguf")


def test_bench_serves_a_model_file_probes_it_and_writes_json_and_a_plot(tiny_gguf, tmp_path, capsys):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    status = main(["bench", str(tiny_gguf), "--slots", "2", "--serve-arg=--max-len=512",
                   "--serve-arg=--weights=float32", "--levels", "1", "2", "--prefix-words", "30", "20",
                   "--json", str(out), "--plot", str(png), "--log", str(tmp_path / "serve.log")])
    assert status == 0, (tmp_path / "serve.log").read_text()[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    load, prefix = run["load"], run["prefix"]["flaxchat"]
    assert load["clients"] == [1, 2] and load["flaxchat"]["failed"] == [0, 0]
    assert all(rate > 0 for rate in load["flaxchat"]["tok_s"]) and all(t > 0 for t in load["flaxchat"]["p50_ttft_ms"])
    assert set(prefix) == {"short_ms", "first_turn_ms", "next_turn_ms", "shared_p50_ms", "distinct_p50_ms"}
    assert all(value > 0 for value in prefix.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| 2 |" in table and "its next turn" in table
    assert (tmp_path / "home" / "models" / "bench-tiny" / "manifest.json").is_file()  # imported on the way


def test_markdown_and_plot_take_several_servers(tmp_path):
    """The JSON shape holds servers side by side (bench/results files carry llama-server's figures too)."""
    run = {"load": {"clients": [1, 4], "flaxchat": {"tok_s": [80.0, 140.0], "p50_ttft_ms": [130, 400]},
                    "llama-server": {"tok_s": [79.0, 98.0], "p50_ttft_ms": [190, 350]}},
           "prefix": {"flaxchat": dict(short_ms=75, first_turn_ms=2215, next_turn_ms=140, shared_p50_ms=519,
                                       distinct_p50_ms=14020),
                      "llama-server": dict(short_ms=63, first_turn_ms=5658, next_turn_ms=272, shared_p50_ms=708,
                                           distinct_p50_ms=30045)}}
    run["load"]["probe client alone"] = {"p50_ttft_ms": [24, 56]}  # bench/null_server.py: TTFTs only
    table = bench.markdown(run)
    assert "| 4 | 140.0 | 400 | 98.0 | 350 | - | 56 |" in table
    assert "| its next turn | 140 | 272 |" in table
    assert bench.plot(run, tmp_path / "two.png").stat().st_size > 10_000


def test_the_null_server_streams_what_the_probes_count(tmp_path):
    """bench/null_server.py (the probe client's own share of a TTFT) answers as the probes read a server:
    the model list, then a stream of max_tokens content chunks with usage, to the openai client unchanged."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import openai

    port = bench._free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "bench" / "null_server.py"), str(port)])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(100):
            try:
                (model,) = client.models.list().data
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "xxxxx"
        assert chunks[-1].usage.completion_tokens == 5
    finally:
        server.terminate()
        server.wait(timeout=10)
