"""Tokenizing a prompt piece by piece, with the pieces remembered.

Chat clients resend the whole conversation every turn, and applications the same long system prompt with
every request; tokenizing ~770 tokens takes ~2 ms alone and several times that while the engine computes on
the same cores (measured: ~7 ms per request in a crowd of 16, bench/RESULTS.md). Hugging Face
``tokenizers`` cuts text at its added tokens (``<|im_start|>``, ``<|im_end|>``, ...) first and then
normalises, pre-tokenizes and tokenizes each piece on its own, so a prompt's ids are its pieces' ids in
order, and a piece seen before (a system prompt, the earlier turns of a conversation) need not be
tokenized again.

That holds only where nothing looks across a cut: added tokens that strip no whitespace and match
anywhere, and no pre-tokenizer that treats the text's first piece differently from the others (Metaspace's
``prepend_scheme="first"``; ByteLevel's ``add_prefix_space`` is excluded too, to stay on the safe side).
``piece_pattern`` checks; a tokenizer that fails the check is always tokenized whole.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any

import tokenizers

SMALLEST_CACHED = 64  # characters: shorter pieces cost less to tokenize than to remember


def _first_piece_sensitive(spec: Any) -> bool:
    """Whether a pre-tokenizer spec (JSON) contains a step whose output depends on a piece's position."""
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" or (spec.get("type") == "ByteLevel" and spec.get("add_prefix_space")):
            return True
        return any(_first_piece_sensitive(value) for value in spec.values())
    if isinstance(spec, list):
        return any(_first_piece_sensitive(value) for value in spec)
    return False


def piece_pattern(backend: tokenizers.Tokenizer) -> re.Pattern | None:
    """A pattern that cuts text where ``backend`` cuts it (its added tokens, leftmost-longest, as its
    Aho-Corasick matcher does), or None where pieces are not tokenized independently."""
    added = backend.get_added_tokens_decoder().values()
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") is not None and any(t.normalized for t in added):
        return None  # matched in normalised text: the cuts could differ from the raw text's
    if _first_piece_sensitive(spec.get("pre_tokenizer")):
        return None
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")")


class PieceCache:
    """Pieces' ids, least recently used dropped first once they hold more than ``max_chars`` characters.
    Thread-safe: requests are tokenized on the server's threads, grammars' words on the engine's."""

    def __init__(self, max_chars: int = 8_000_000):
        self.max_chars = max_chars
        self._entries: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, piece: str) -> list[int] | None:
        with self._lock:
            ids = self._entries.get(piece)
            if ids is not None:
                self._entries.move_to_end(piece)
            return ids

    def put(self, piece: str, ids: list[int]) -> None:
        if len(piece) < SMALLEST_CACHED or len(piece) > self.max_chars // 8:
            return
        with self._lock:
            if piece in self._entries:
                return
            self._entries[piece] = ids
            self._chars += len(piece)
            while self._chars > self.max_chars:
                dropped, _ = self._entries.popitem(last=False)
                self._chars -= len(dropped)

    def __len__(self) -> int:
        return len(self._entries)


def encode_by_pieces(backend: tokenizers.Tokenizer, pattern: re.Pattern, added_ids: dict[str, int],
                     cache: PieceCache, text: str) -> list[int]:
    """``backend.encode(text, add_special_tokens=False).ids``, from the pieces between added tokens: cached
    pieces are looked up, the others tokenized in one batch call and remembered."""
    parts = pattern.split(text)  # text, added token, text, ...
    found: list[list[int] | None] = []
    missing: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:
            found.append([added_ids[part]])
        elif not part:
            found.append([])
        else:
            ids = cache.get(part)
            found.append(ids)
            if ids is None:
                missing.append(i)
    if missing:
        encoded = backend.encode_batch([parts[i] for i in missing], add_special_tokens=False)
        for i, encoding in zip(missing, encoded):
            found[i] = encoding.ids
            cache.put(parts[i], encoding.ids)
    return [token for ids in found for token in ids]  # type: ignore[union-attr]
