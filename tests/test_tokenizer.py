"""Our tokenizers against transformers' (and sentencepiece's own) on a varied corpus."""

import io
import json

import pytest
import sentencepiece as spm

from flaxchat.model.tokenizer import HFTokenizer, SentencePieceTokenizer, SpecialTokens

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Accents: café, naïve, résumé, Ångström, façade, Übermensch",
    "Emoji: 😀 👍🏽 🇫🇷 ❤️‍🔥 and a family 👨‍👩‍👧",
    "CJK: 中文分词测试，日本語のテキスト、한국어 문장",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Whitespace   runs\t\ttabs\n\n\nnewlines    end   ",
    "Numbers: 3.14159, 1,000,000 and 2024-11-24; x1000 y42",
    "Mixed: <b>bold</b> & 'quotes' \"double\" — em dash … ellipsis",
    "Ελληνικά, русский текст, עברית, العربية",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2_tokenizers(default_imported, default_reference_folder):
    from transformers import AutoTokenizer

    ours = HFTokenizer.from_json(default_imported.tokenizer_files["tokenizer.json"].decode(), SpecialTokens())
    reference = AutoTokenizer.from_pretrained(default_reference_folder)  # transformers' reading of the GGUF
    return ours, reference


@pytest.mark.default_model
@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_encode_decode_equal_transformers(smollm2_tokenizers, text):
    ours, reference = smollm2_tokenizers
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == reference.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.default_model
def test_smollm2_token_bytes_concatenate_to_utf8(smollm2_tokenizers):
    """Per-token bytes (for logprobs and incremental decoding) rebuild multi-byte text exactly."""
    ours, _ = smollm2_tokenizers
    for text in CORPUS:
        ids = ours.encode(text)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode()


# --- sentencepiece -----------------------------------------------------------------------------

SPM_TRAINING = [line for line in CORPUS if "<|" not in line] * 30


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory):
    """A Llama-style sentencepiece BPE model trained here, and transformers' tokenizer for it."""
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TRAINING), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "legacy": False,
    }))
    ours = SentencePieceTokenizer(model.getvalue(), SpecialTokens(bos_token="<s>", bos_id=1, eos_id=2))
    return ours, AutoTokenizer.from_pretrained(str(folder)), spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.mark.parametrize("text", CORPUS)
def test_sentencepiece_matches_sentencepiece_itself(spm_pair, text):
    ours, _, processor = spm_pair
    ids = ours.encode(text)
    if "<|" not in text:
        assert ids == processor.encode(text)
    assert ours.decode(ids) == text
    if "<|" not in text:  # the dummy-prefix space is part of the first token's bytes
        assert b"".join(ours.token_bytes(i) for i in ids) == (" " + text).encode()


@pytest.mark.parametrize("text", [t for t in CORPUS if "  " not in t])
def test_sentencepiece_matches_transformers(spm_pair, text):
    """Equal to transformers' LlamaTokenizer (legacy=False). Texts with runs of spaces are left out: there
    transformers' converted BPE merges "▁▁▁" differently from sentencepiece itself, which is the model's
    real tokenizer; those texts are checked against sentencepiece above."""
    ours, reference, _ = spm_pair
    theirs = reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == theirs
    assert ours.decode(theirs) == reference.decode(theirs)


def test_sentencepiece_add_bos_and_specials(spm_pair):
    ours, reference, _ = spm_pair
    ids = ours.encode("<s>hi", add_bos=False)
    assert ids == reference.encode("<s>hi", add_special_tokens=False)
    assert ours.encode("hi", add_bos=True)[0] == 1
    assert ours.decode(ours.encode("<|im_start|>user")) == "<|im_start|>user"


def test_spm_style_gguf_vocab_rebuilds_the_sentencepiece_model(spm_pair):
    """A GGUF 'llama' tokenizer (tokens, scores, types) becomes a sentencepiece model that tokenizes alike."""
    from pathlib import Path

    from sentencepiece import sentencepiece_model_pb2 as sp_model

    from flaxchat.checkpoints.gguf_import import tokenizer_from_metadata

    ours, _, processor = spm_pair
    proto = sp_model.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": True,
    }
    files, config = tokenizer_from_metadata(meta, Path("vocab.gguf"))
    rebuilt = SentencePieceTokenizer(files["tokenizer.model"], SpecialTokens())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["add_bos_token"] is True
    for text in CORPUS:
        assert rebuilt.encode(text) == ours.encode(text)
        assert rebuilt.decode(rebuilt.encode(text)) == text


def test_sentencepiece_tokenizers_work_with_grammars(spm_pair):
    """llguidance sees sentencepiece pieces as their bytes (▁ -> space, <0x..> -> the byte)."""
    import llguidance

    from flaxchat.sampling.constraints import json_schema_grammar, ll_tokenizer

    ours = spm_pair[0]
    grammar = json_schema_grammar({"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]})
    ids = ours.encode('<|im_end|>{"word":"héllo wörld"}')[1:]  # after a special token: no dummy-prefix space
    matcher = llguidance.LLMatcher(ll_tokenizer(ours, ours.vocab_size), grammar)
    assert all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()
    bad = llguidance.LLMatcher(ll_tokenizer(ours, ours.vocab_size), grammar)
    assert not all(bad.consume_token(t) for t in ours.encode('<|im_end|>{"wrd":1}')[1:])


# --- tokenizing by pieces (model/token_segments.py) ---------------------------------------------


def _trained_bpe(pre_tokenizer, lstrip: bool = False):
    """A small byte-level BPE trained here, with special and plain added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(CORPUS * 20, trainer)
    backend.add_tokens([AddedToken("<think>", lstrip=lstrip), "</think>"])  # added, not special (as Qwen's)
    return HFTokenizer(backend, SpecialTokens())


def _texts_with_added_tokens(seed: int, count: int) -> list[str]:
    import random

    rng = random.Random(seed)
    pieces = [*CORPUS, "<|im_start|>", "<|im_end|>", "<think>", "</think>", " ", "\n", "<|im_", "think>"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 9))) for _ in range(count)]


def test_a_prompt_tokenized_by_pieces_gets_the_ids_of_the_whole_text():
    """Cut at added tokens and tokenized piece by piece (pieces seen before come from the cache), every
    text gets exactly the ids the tokenizer gives the whole text: cold, then again from the cache."""
    from tokenizers import pre_tokenizers

    ours = _trained_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    assert ours._pieces is not None
    texts = _texts_with_added_tokens(0, 300)
    for _ in range(2):
        for text in texts:
            assert ours.encode(text) == ours.backend.encode(text, add_special_tokens=False).ids, text
    assert len(ours._pieces[2]) > 0  # long pieces were remembered


def test_tokenizers_that_look_across_pieces_are_tokenized_whole():
    from tokenizers import pre_tokenizers

    for backend in (_trained_bpe(pre_tokenizers.Metaspace(prepend_scheme="first")),
                    _trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True)),
                    _trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), lstrip=True)):
        assert backend._pieces is None
        for text in _texts_with_added_tokens(1, 50):
            assert backend.encode(text) == backend.backend.encode(text, add_special_tokens=False).ids


def test_the_piece_cache_keeps_the_recently_used_within_its_budget():
    from flaxchat.model.token_segments import SMALLEST_CACHED, PieceCache

    cache = PieceCache(max_chars=10 * SMALLEST_CACHED)
    pieces = [str(i) * SMALLEST_CACHED for i in range(10)]
    for i, piece in enumerate(pieces):
        cache.put(piece, [i])
    assert cache.get(pieces[0]) == [0]  # now the most recently used
    cache.put("x" * SMALLEST_CACHED, [99])
    assert cache.get(pieces[1]) is None and cache.get(pieces[0]) == [0] and len(cache) == 10
    cache.put("short", [1])  # too short to be worth remembering
    assert cache.get("short") is None


@pytest.mark.default_model
def test_smollm2_by_pieces_equals_transformers(smollm2_tokenizers):
    ours, reference = smollm2_tokenizers
    assert ours._pieces is not None
    for text in _texts_with_added_tokens(2, 60) * 2:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
