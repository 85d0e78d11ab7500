"""Tokenizer files: read them from HF folders, synthesise them from GGUF vocabularies, load them.

A stored model keeps either ``tokenizer.json`` (HF ``tokenizers``) or ``tokenizer.model``
(sentencepiece) plus ``tokenizer_config.json`` (special tokens, chat template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from flaxchat.checkpoints.errors import CheckpointError
from flaxchat.model.tokenizer import HFTokenizer, SentencePieceTokenizer, SpecialTokens, Tokenizer

# Chat-turn terminators that end a generation as EOS does.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

# How GGUF's ``tokenizer.ggml.pre`` says text is split before byte-level BPE (as llama.cpp does).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str | None):
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return plain
    if pre == "smollm":  # SmolLM's own tokenizer.json: every digit alone, then GPT-2 splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), plain])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}.get(pre)
    if split is None:
        return None
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def stop_ids_for(vocab: dict[str, int], eos_id: int | None, extra: list[int] = ()) -> frozenset[int]:
    ids = {eos_id, *extra} | {vocab[t] for t in TURN_END_TOKENS if t in vocab}
    return frozenset(i for i in ids if i is not None)


def byte_level_bpe_json(meta: dict[str, Any], path: Path) -> str:
    """Build a ``tokenizer.json`` from a GGUF gpt2-style vocabulary (tokens, merges, token types)."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre")
    pre_tokenizer = _byte_level_pre_tokenizer(pre)
    if pre_tokenizer is None:
        raise CheckpointError(path, f"unsupported GGUF pre-tokenizer {pre!r}")
    backend = HFBackend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # 3 = CONTROL (special, e.g. <|im_end|>), 4 = USER_DEFINED (matched whole, not special, e.g. <think>).
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    return backend.to_str()


def sentencepiece_proto(meta: dict[str, Any]) -> bytes:
    """Build a sentencepiece ``ModelProto`` from a GGUF llama-style (SPM) vocabulary."""
    proto = sp_model.ModelProto()
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    proto.trainer_spec.model_type = sp_model.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = any(k == 6 for k in types)
    proto.trainer_spec.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    proto.trainer_spec.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    proto.trainer_spec.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    proto.trainer_spec.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def load_tokenizer(folder: Path) -> Tokenizer:
    """Load a stored tokenizer (``tokenizer.json`` or ``tokenizer.model`` + ``tokenizer_config.json``)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    json_path, spm_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if json_path.is_file():
        backend = HFBackend.from_file(str(json_path))
        vocab = backend.get_vocab(with_added_tokens=True)
        build = lambda special: HFTokenizer(backend, special)  # noqa: E731
    elif spm_path.is_file():
        proto = spm_path.read_bytes()
        probe = SentencePieceTokenizer(proto, SpecialTokens())
        vocab = {probe.processor.id_to_piece(i): i for i in range(probe.vocab_size)}
        build = lambda special: SentencePieceTokenizer(proto, special)  # noqa: E731
    else:
        raise CheckpointError(folder, "no tokenizer.json or tokenizer.model found")
    special = special_tokens_from_config(config, vocab)
    return build(special)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # old tokenizer_config.json stores AddedToken dicts
        return value.get("content")
    return value


def special_tokens_from_config(config: dict[str, Any], vocab: dict[str, int]) -> SpecialTokens:
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    bos_id = vocab.get(bos) if bos else None
    eos_id = vocab.get(eos) if eos else None
    extra = [int(i) for i in config.get("flaxchat_stop_token_ids", [])]
    return SpecialTokens(
        bos_token=bos,
        eos_token=eos,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(config.get("add_bos_token", False)),
        stop_ids=stop_ids_for(vocab, eos_id, extra),
    )


def read_hf_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer files of an HF model folder, to copy into the store."""
    files = {}
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja", "special_tokens_map.json"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise CheckpointError(folder, "no tokenizer.json or tokenizer.model found")
    return files
