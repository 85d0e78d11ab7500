"""Two processes serving as one (``flaxchat serve --coordinator``; ``flaxchat/cluster.py``,
``sampling/lockstep.py``): on this machine, two local processes with two fake CPU devices each form one
data=2,model=2 mesh (the data axis across the processes, gloo collectives between them). Through HTTP with
the official client, the cluster answers exactly as one process on the same mesh does: greedy and seeded
replies, logprobs, n=2 across data shards, a cached second turn, streaming, a seeded request among others;
and stopping process 0 stops the other."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model

SERVE = ["--slots", "4", "--max-len", "128", "--prefix-cache-mb", "0.25", "--mesh", "data=2,model=2", "--no-warmup"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, home: Path, devices: int, log: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "FLAXCHAT_HOME": str(home), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "flaxchat.cli", "serve", model, *SERVE, *extra], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(url: str, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("server did not come up:\n" + "\n".join(log.read_text()[-3000:] for log in logs))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(the cluster's URL, its processes and logs, the one-process server's URL)."""
    folder = tmp_path_factory.mktemp("multihost")
    model = write_gguf(make_tiny_model("llama", folder / "hf"), folder / "tiny.gguf")
    home = folder / "home"
    subprocess.run([sys.executable, "-m", "flaxchat.cli", "import", str(model), "--name", "tiny"], check=True, capture_output=True,
                   env={**os.environ, "FLAXCHAT_HOME": str(home), "JAX_PLATFORMS": "cpu"})
    coordinator, cluster_port, single_port = _free_port(), _free_port(), _free_port()
    logs = [folder / "process0.log", folder / "process1.log", folder / "single.log"]
    cluster = [_start("tiny", home, 2, logs[i], ["--port", str(cluster_port), "--coordinator",
                                                 f"127.0.0.1:{coordinator}", "--num-processes", "2",
                                                 "--process-id", str(i)]) for i in range(2)]
    single = _start("tiny", home, 4, logs[2], ["--port", str(single_port)])
    try:
        _wait(f"http://127.0.0.1:{cluster_port}", cluster, logs[:2])
        _wait(f"http://127.0.0.1:{single_port}", [single], logs[2:])
        yield f"http://127.0.0.1:{cluster_port}", cluster, logs, f"http://127.0.0.1:{single_port}"
    finally:
        for process in [*cluster, single]:
            if process.poll() is None:
                process.kill()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _reply(url: str, **request) -> list[tuple[str, list]]:
    reply = _client(url).chat.completions.create(model="tiny", **request)
    return [(c.message.content, [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
                                 for t in (c.logprobs.content if c.logprobs else [])]) for c in reply.choices]


HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
TURN = [{"role": "system", "content": "You are a terse assistant who answers in one line. " * 2},
        {"role": "user", "content": "Name a colour."}]


def test_two_processes_answer_exactly_as_one(servers):
    cluster, _, _, single = servers
    requests = [dict(messages=HELLO, max_tokens=12, temperature=0),
                dict(messages=HELLO, max_tokens=12, temperature=0.9, seed=7, logprobs=True, top_logprobs=2),
                dict(messages=TURN, max_tokens=10, temperature=1.0, seed=3, n=2),  # choices on both data shards
                dict(messages=TURN, max_tokens=10, temperature=1.0, seed=3, n=2)]  # its prompt from the cache
    for request in requests:
        mine = _reply(cluster, **request)
        assert mine == _reply(single, **request) and mine[0][0]
    assert _reply(cluster, **requests[2]) == _reply(cluster, **requests[3])


def test_the_cluster_keeps_the_seed_contract_under_load_and_streams_the_same_text(servers):
    cluster = servers[0]
    seeded = dict(messages=HELLO, max_tokens=16, temperature=0.9, seed=11, logprobs=True)
    alone = _reply(cluster, **seeded)
    others = [dict(messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=8 + i, temperature=1.0,
                   seed=i) for i in range(6)]
    with ThreadPoolExecutor(7) as pool:
        loaded = pool.submit(_reply, cluster, **seeded)
        for future in [pool.submit(_reply, cluster, **request) for request in others]:
            future.result()
        assert loaded.result() == alone
    stream = _client(cluster).chat.completions.create(model="tiny", stream=True, **seeded)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == alone[0][0]


def test_stopping_process_0_stops_the_cluster(servers):
    cluster_url, cluster, logs, _ = servers
    assert httpx.get(cluster_url + "/health").status_code == 200
    cluster[0].send_signal(signal.SIGINT)
    for process in cluster:
        assert process.wait(timeout=120) == 0
    assert "process 0 stopped its engine after" in logs[1].read_text()
