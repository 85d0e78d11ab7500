"""One tokenizer interface over two backends: Hugging Face ``tokenizers`` and ``sentencepiece``.

Both are built from in-memory file contents (``tokenizer.json`` text or a ``.model`` protobuf), so this
module never touches the filesystem; ``checkpoints/`` decides where the files live.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model
import tokenizers

from flaxchat.model.token_segments import PieceCache, encode_by_pieces, piece_pattern


@dataclass(frozen=True)
class SpecialTokens:
    """Special-token strings and ids that templates and the engine need."""

    bos_token: str | None = None
    eos_token: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False  # prepend BOS when encoding a raw (non-chat) prompt
    # Ids that end a generation: EOS plus chat turn terminators such as <|im_end|> or <|eot_id|>.
    stop_ids: frozenset[int] = field(default_factory=frozenset)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


class Tokenizer(abc.ABC):
    """The interface the rest of flaxchat uses."""

    special: SpecialTokens

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Tokenize text; special-token strings in the text (e.g. ``<|im_start|>``) become their ids."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes a single token contributes (may be part of a multi-byte character)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @property
    @abc.abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids of control tokens (never produced by tokenizing plain text)."""

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.special.stop_ids

    def derived(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """A value computed once from this tokenizer (e.g. llguidance's view of it) and kept on it, so it
        lives and dies with the tokenizer; callers serialise calls for the same key."""
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]


class HFTokenizer(Tokenizer):
    """Backend over ``tokenizers.Tokenizer`` (``tokenizer.json``), e.g. byte-level BPE."""

    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialTokens):
        self.backend = backend
        self.special = special

    @classmethod
    def from_json(cls, text: str, special: SpecialTokens) -> "HFTokenizer":
        return cls(tokenizers.Tokenizer.from_str(text), special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def _pieces(self) -> tuple[re.Pattern, dict[str, int], PieceCache] | None:
        """How ``encode`` cuts text into independently tokenized pieces (``model/token_segments.py``), or None."""
        pattern = piece_pattern(self.backend)
        if pattern is None:
            return None
        added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}
        return pattern, added, PieceCache()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        pieces = self._pieces
        if pieces is None:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = encode_by_pieces(self.backend, *pieces, text)
        if add_bos and self.special.bos_id is not None:
            ids = [self.special.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in self.backend.to_str()

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Added tokens marked special (control tokens such as <|im_end|>); added tokens that are not special
        (Qwen's <think>) are text."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.special_ids:
            return piece.encode()
        if self._byte_level:
            return bytes(UNICODE_TO_BYTE.get(ch, 0) for ch in piece)
        return _sentencepiece_piece_bytes(piece)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _sentencepiece_piece_bytes(piece: str) -> bytes:
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


class SentencePieceTokenizer(Tokenizer):
    """Backend over a sentencepiece model (``tokenizer.model``), e.g. Llama 2, Mistral, Gemma.

    sentencepiece itself does not recognise control tokens written in text, so ``encode`` first splits
    the text on the model's control/user-defined token strings, as Hugging Face tokenizers do.
    """

    def __init__(self, model_proto: bytes, special: SpecialTokens):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.special = special
        proto = sp_model.ModelProto()
        proto.ParseFromString(model_proto)
        kinds = (sp_model.ModelProto.SentencePiece.CONTROL, sp_model.ModelProto.SentencePiece.USER_DEFINED)
        # Control pieces with empty-looking names (<s>, </s>) are still matched in text, as HF does.
        specials = sorted({p.piece for p in proto.pieces if p.type in kinds and p.piece}, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Split on special tokens; only text at the very start gets sentencepiece's dummy-prefix space.

        This is transformers' non-legacy Llama behaviour (``legacy=False``, Metaspace ``prepend_scheme="first"``):
        text that follows a special token (``<|im_start|>user``) is not given a leading space.
        """
        ids: list[int] = []
        parts: Sequence[str] = self._special_pattern.split(text) if self._special_pattern else [text]
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 1:
                ids.append(self.processor.piece_to_id(part))
            elif i == 0:
                ids.extend(self.processor.encode(part))
            else:
                ids.extend(self._encode_without_prefix(part))
        if add_bos and self.special.bos_id is not None:
            ids = [self.special.bos_id] + ids
        return ids

    def _encode_without_prefix(self, text: str) -> list[int]:
        # sentencepiece cannot switch off the dummy prefix per call; encode behind the unk piece's text and
        # drop its tokens (the same trick transformers' sentencepiece tokenizer uses).
        anchor = self.processor.id_to_piece(self.processor.unk_id())
        return self.processor.encode(anchor + text)[len(self.processor.encode(anchor)):]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if not skip_special_tokens:
            # sentencepiece drops control tokens on decode; keep them, as HF does.
            out, run = [], []
            for i in ids:
                if self.processor.is_control(i):
                    out.append(self.processor.decode(run))
                    out.append(self.processor.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            out.append(self.processor.decode(run))
            return "".join(out)
        return self.processor.decode([i for i in ids if not self.processor.is_control(i)])

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Control pieces (<s>, </s>, ...)."""
        return frozenset(i for i in range(self.vocab_size) if self.processor.is_control(i))

    def token_bytes(self, token_id: int) -> bytes:
        if self.processor.is_control(token_id):
            return self.processor.id_to_piece(token_id).encode()
        return _sentencepiece_piece_bytes(self.processor.id_to_piece(token_id))

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        return None if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id) else token_id
