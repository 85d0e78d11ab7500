"""API keys and their token accounting, in SQLite (WAL), so budgets survive restarts and crashes.

Keys are stored as SHA-256 hashes (a key is a random 192-bit token, so a fast hash is enough; the key itself
is shown once, when it is made). A request reserves its worst case (prompt + ``max_tokens`` x choices) before it
runs and settles what it used when it ends, each in one transaction, so concurrent requests of a key can never
spend past its budget. Reservations left by a process that died (``kill -9``, a crash) are charged in full
when the ledger is opened next: the tokens may have been delivered, and charging them keeps the key within
its budget, which the reservation already respected.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flaxchat.serve.errors import APIError

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    hash TEXT UNIQUE NOT NULL,
    budget INTEGER,                       -- total tokens allowed; NULL: unlimited
    spent INTEGER NOT NULL DEFAULT 0,     -- tokens settled so far
    revoked INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    name: str
    budget: int | None
    spent: int
    reserved: int
    revoked: bool


@dataclass(frozen=True)
class Reservation:
    id: int | None  # None: nothing reserved (the caller has no budget to keep)
    hash: str
    tokens: int


class Ledger:
    """The key table and the token ledger; ``path`` None keeps them in memory (tests, flag-only keys)."""

    def __init__(self, path: str | Path | None = None):
        self.path = path
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if path is None else str(path), isolation_level=None,
                                   check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._charge_abandoned_reservations()

    def _charge_abandoned_reservations(self) -> None:
        with self._transaction():
            for hash_, tokens in self._db.execute("SELECT hash, SUM(tokens) FROM reservations GROUP BY hash").fetchall():
                self._db.execute("UPDATE keys SET spent = spent + ? WHERE hash = ?", (tokens, hash_))
            self._db.execute("DELETE FROM reservations")

    def _transaction(self):
        db = self._db

        class Transaction:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return Transaction()

    # ---- keys --------------------------------------------------------------------------------------------
    def add_key(self, name: str, budget: int | None = None, key: str | None = None) -> str:
        """Store a key under ``name`` (a new random one unless given) and return it; an existing name or key
        keeps what it spent and takes the new budget."""
        if budget is not None and budget < 0:
            raise ValueError("a budget must be >= 0 tokens")
        key = key or "fc-" + secrets.token_urlsafe(24)
        try:
            with self._lock, self._transaction():
                self._db.execute("INSERT INTO keys (name, hash, budget, created) VALUES (?, ?, ?, ?) "
                                 "ON CONFLICT(hash) DO UPDATE SET budget = excluded.budget, revoked = 0",
                                 (name, key_hash(key), budget, time.time()))
        except sqlite3.IntegrityError:
            raise ValueError(f"a key named {name!r} exists already") from None
        return key

    def sync_keys(self, prefix: str, budgets: dict[str, int | None]) -> None:
        """Make the keys named ``prefix...`` exactly ``budgets``' keys (key -> budget): the ones given are added
        or updated (keeping what they spent), the others revoked (keys from flags or a file, which a restart
        without them must not leave valid)."""
        hashes = {key_hash(key) for key in budgets}
        for key, budget in budgets.items():
            self.add_key(f"{prefix}{key_hash(key)[:12]}", budget, key=key)
        with self._lock, self._transaction():
            for name, hash_ in self._db.execute("SELECT name, hash FROM keys WHERE name LIKE ? AND revoked = 0",
                                                (prefix + "%",)).fetchall():
                if hash_ not in hashes:
                    self._db.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,))

    def revoke(self, name: str) -> bool:
        with self._lock, self._transaction():
            return self._db.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,)).rowcount > 0

    def keys(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, budget, spent, revoked, (SELECT COALESCE(SUM(tokens), 0) FROM reservations r "
                "WHERE r.hash = k.hash) FROM keys k ORDER BY created").fetchall()
        return [KeyInfo(name, budget, spent, reserved, bool(revoked)) for name, budget, spent, revoked, reserved in rows]

    @property
    def has_keys(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM keys WHERE revoked = 0 LIMIT 1").fetchone() is not None

    def identify(self, key: str) -> str | None:
        """The caller's identity (its key's hash) for a valid, unrevoked key; None otherwise."""
        presented = key_hash(key)
        with self._lock:
            row = self._db.execute("SELECT hash FROM keys WHERE hash = ? AND revoked = 0", (presented,)).fetchone()
        return row[0] if row is not None and hmac.compare_digest(row[0], presented) else None

    # ---- tokens ------------------------------------------------------------------------------------------
    def check(self, identity: str) -> None:
        """402 once a key's budget is spent (before a request is even read)."""
        with self._lock:
            row = self._db.execute("SELECT budget, spent FROM keys WHERE hash = ?", (identity,)).fetchone()
        if row is not None and row[0] is not None and row[1] >= row[0]:
            raise APIError(402, f"This API key has used its budget of {row[0]} tokens.", type="insufficient_quota",
                           code="insufficient_quota")

    def reserve(self, identity: str, tokens: int) -> Reservation:
        """Hold ``tokens`` of the key's budget for a request (402 when they are not left)."""
        with self._lock, self._transaction():
            row = self._db.execute("SELECT budget, spent FROM keys WHERE hash = ?", (identity,)).fetchone()
            if row is None or row[0] is None:
                return Reservation(None, identity, tokens)
            budget, spent = row
            (held,) = self._db.execute("SELECT COALESCE(SUM(tokens), 0) FROM reservations WHERE hash = ?",
                                       (identity,)).fetchone()
            if spent + held + tokens > budget:
                raise APIError(402, f"This request may use up to {tokens} tokens (prompt and max_tokens x n) but "
                                    f"this API key has {max(budget - spent - held, 0)} of its budget of {budget} left. "
                                    f"Lower max_tokens or n.", type="insufficient_quota", code="insufficient_quota")
            cursor = self._db.execute("INSERT INTO reservations (hash, tokens, created) VALUES (?, ?, ?)",
                                      (identity, tokens, time.time()))
            return Reservation(cursor.lastrowid, identity, tokens)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Charge what the request used (never more than it reserved) and release the reservation."""
        if reservation.id is None:
            return
        with self._lock, self._transaction():
            self._db.execute("UPDATE keys SET spent = spent + ? WHERE hash = ?",
                             (min(used, reservation.tokens), reservation.hash))
            self._db.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))


def default_ledger_path() -> Path:
    from flaxchat.checkpoints.store import flaxchat_home

    return Path(os.environ.get("FLAXCHAT_LEDGER") or flaxchat_home() / "ledger.sqlite3")
