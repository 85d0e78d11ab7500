"""The key ledger: hashed keys, reservations that keep a key within its budget under concurrency, and accounting
that survives a restart and a ``kill -9`` (in the middle of a request, and in the middle of a transaction)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading

import openai
import pytest

from flaxchat.chat.request import ServedModel
from flaxchat.serve.app import ServerSettings, create_app
from flaxchat.serve.errors import APIError
from flaxchat.serve.ledger import Ledger, key_hash
from flaxchat.serve.server import BackgroundServer
from tests.engine_fixtures import tiny_engine
from tests.gguf_writer import CHAT_TEMPLATE
from tests.server_fixtures import TINY_ID

HELLO = [{"role": "user", "content": "hi"}]


def test_keys_are_stored_hashed_and_revocable(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    key = ledger.add_key("alice", budget=100)
    assert key.startswith("fc-") and ledger.identify(key) == key_hash(key)
    assert ledger.identify(key + "x") is None and ledger.identify("") is None
    del ledger
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert key.encode() not in stored and key_hash(key).encode() in stored
    ledger = Ledger(path)
    assert ledger.identify(key) is not None and ledger.revoke("alice") and ledger.identify(key) is None
    with pytest.raises(ValueError, match="exists"):
        ledger.add_key("alice")


def test_flag_keys_are_synced_and_dropped_ones_revoked(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.sync_keys("flag-", {"sk-one": 10, "sk-two": None})
    assert ledger.identify("sk-one") and ledger.identify("sk-two")
    ledger.sync_keys("flag-", {"sk-two": 5})
    assert ledger.identify("sk-one") is None and ledger.identify("sk-two")
    assert [k.budget for k in ledger.keys() if not k.revoked] == [5]


def test_concurrent_reservations_never_pass_the_budget(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite3")
    identity = ledger.identify(ledger.add_key("busy", budget=100))
    granted, refused = [], []

    def one() -> None:
        try:
            granted.append(ledger.reserve(identity, 30))
        except APIError as error:
            refused.append(error.status)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 3 and refused == [402] * 9  # 3 x 30 <= 100 < 4 x 30
    for reservation in granted:
        ledger.settle(reservation, 25)  # used less than reserved
    (info,) = ledger.keys()
    assert (info.spent, info.reserved) == (75, 0)
    ledger.reserve(identity, 25)  # exactly what is left
    with pytest.raises(APIError):
        ledger.reserve(identity, 1)


KILLED_MID_REQUEST = """
import os, signal, sys
from flaxchat.serve.ledger import Ledger
ledger = Ledger(sys.argv[1])
ledger.settle(ledger.reserve(ledger.identify(sys.argv[2]), 10), 10)
ledger.reserve(ledger.identify(sys.argv[2]), 40)  # a request in flight
os.kill(os.getpid(), signal.SIGKILL)
"""

KILLED_MID_TRANSACTION = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE keys SET spent = spent + 1000")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True)
    assert result.returncode == -9, result.stderr[-500:]


def test_accounting_survives_kill_9(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    key = Ledger(path).add_key("carol", budget=100)
    _killed(KILLED_MID_REQUEST, str(path), key)
    ledger = Ledger(path)  # the dead process's reservation is charged in full
    (info,) = ledger.keys()
    assert (info.spent, info.reserved) == (50, 0)
    del ledger
    _killed(KILLED_MID_TRANSACTION, str(path))
    ledger = Ledger(path)  # the half-done transaction never happened
    (info,) = ledger.keys()
    assert info.spent == 50
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_servers_budgets_survive_its_restart(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    key = Ledger(path).add_key("dave", budget=45)
    spent = 0
    engine = tiny_engine(tmp_path / "model")
    for run in range(2):  # two servers, one after the other, on one ledger file (and one engine: it is not the subject)
        model = ServedModel(TINY_ID, engine, engine.tokenizer, CHAT_TEMPLATE, "fp_test")
        server = BackgroundServer(create_app(model, ServerSettings(ledger=Ledger(path)))).start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            if run == 0:  # one request fits (worst case ~26 tokens), and is charged what it used
                spent = client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=6).usage.total_tokens
            else:  # after the restart the same key has only what is left
                with pytest.raises(openai.APIStatusError) as info:
                    client.chat.completions.create(model=TINY_ID, messages=HELLO, max_tokens=45 - spent)
                assert info.value.status_code == 402 and f"{45 - spent} of its budget" in info.value.body["message"]
                with pytest.raises(openai.AuthenticationError):
                    openai.OpenAI(base_url=server.url + "/v1", api_key="fc-wrong", max_retries=0).models.list()
        finally:
            server.stop()
    engine.stop()
    assert [(k.spent, k.reserved) for k in Ledger(path).keys()] == [(spent, 0)]


def test_keys_command_adds_lists_and_revokes(tmp_path):
    env = {**os.environ, "FLAXCHAT_HOME": str(tmp_path)}

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flaxchat", "keys", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    added = keys("add", "erin", "--budget", "500")
    assert added.returncode == 0 and added.stdout.strip().startswith("fc-")
    listed = keys("list").stdout
    assert "erin" in listed and "budget=500" in listed and added.stdout.strip() not in listed
    assert keys("revoke", "erin").returncode == 0 and "REVOKED" in keys("list").stdout
    assert keys("revoke", "nobody").returncode == 1
    assert Ledger(tmp_path / "ledger.sqlite3").identify(added.stdout.strip()) is None
