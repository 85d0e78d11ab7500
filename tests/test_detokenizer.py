"""Incremental detokenizer and stop strings: property tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxchat.sampling.detokenizer import IncrementalDetokenizer, StopStringFilter
from tests.test_tokenizer import CORPUS


@pytest.fixture(scope="module")
def smollm2(default_imported):
    from flaxchat.model.tokenizer import HFTokenizer, SpecialTokens

    return HFTokenizer.from_json(default_imported.tokenizer_files["tokenizer.json"].decode(), SpecialTokens())


def _stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.default_model
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_token_streams_reassemble(smollm2, data):
    """Any token sequence, even one that splits characters: deltas + flush == decode(all); no delta carries
    a U+FFFD that the full decode does not have."""
    ids = data.draw(st.lists(st.integers(0, smollm2.vocab_size - 1), max_size=24))
    pieces, rest = _stream(smollm2, ids)
    full = smollm2.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + rest == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.default_model
@pytest.mark.parametrize("text", CORPUS)
def test_corpus_streams_without_broken_characters(smollm2, text):
    pieces, rest = _stream(smollm2, smollm2.encode(text))
    assert rest == "" and "".join(pieces) == smollm2.decode(smollm2.encode(text), skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_leading_spaces():
    import io

    import sentencepiece as spm

    from flaxchat.model.tokenizer import SentencePieceTokenizer, SpecialTokens
    from tests.test_tokenizer import SPM_TRAINING

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SPM_TRAINING), model_writer=model, vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    tokenizer = SentencePieceTokenizer(model.getvalue(), SpecialTokens())
    for text in CORPUS:
        ids = tokenizer.encode(text)
        pieces, rest = _stream(tokenizer, ids)
        assert "".join(pieces) + rest == tokenizer.decode(ids)


alphabet = st.sampled_from("ab\nxyz")


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet, max_size=40), stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_strings_never_leak_and_keep_the_text_before(text, stops, cuts):
    chunks, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        chunks.append(text[last:cut])
        last = max(last, cut)
    stop_filter = StopStringFilter(tuple(stops))
    out = ""
    for chunk in chunks:
        out += stop_filter.push(chunk)
        if stop_filter.stopped:
            break
    if not stop_filter.stopped:
        out += stop_filter.flush()
    # Reference: generation stops after the first chunk whose arrival completes some stop string; the
    # output is cut where the earliest stop string complete at that moment begins.
    expected, end = text, 0
    for chunk in chunks:
        end += len(chunk)
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            expected = text[: min(hits)]
            break
    assert out == expected
    assert stop_filter.stopped == bool(hits)
    assert not any(s in out for s in stops)


def test_overlapping_stops_cut_at_the_first_complete_one():
    stop_filter = StopStringFilter(("abc", "b"))
    assert stop_filter.push("ab") == "a" and stop_filter.stopped


def test_stop_string_split_across_deltas():
    stop_filter = StopStringFilter(("</answer>",))
    assert stop_filter.push("The answer is 4.</ans") == "The answer is 4."
    assert stop_filter.pending == "</ans"
    assert stop_filter.push("wer> trailing") == "" and stop_filter.stopped


def test_held_text_is_released_when_no_stop_follows():
    stop_filter = StopStringFilter(("STOP",))
    assert stop_filter.push("go ST") == "go "
    assert stop_filter.push("ART") == "START"
    assert stop_filter.push(" S") == " "
    assert stop_filter.flush() == "S"


BLOCKED = (r"sec\s*ret", "bad")


@settings(max_examples=300, deadline=None)
@given(before=st.text(alphabet="abcdes rt\n", max_size=30), after=st.text(alphabet="abcdes rt", max_size=10),
       blocked=st.sampled_from(["secret", "sec  ret", "bad"]), cuts=st.lists(st.integers(0, 60), max_size=12))
def test_no_streamed_prefix_shows_any_part_of_blocked_text(before, after, blocked, cuts):
    import regex

    text = before + blocked + after
    first = min(m.start() for m in (regex.search(p, text) for p in BLOCKED) if m)
    pieces = [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    stream, shown = StopStringFilter((), BLOCKED), ""
    for piece in pieces:
        shown += stream.push(piece)
        assert text[:first].startswith(shown)  # never past the match's start, so no part of it is shown
        if stream.stopped:
            break
    shown += stream.flush()
    assert shown == text[:first] and stream.stopped and stream.reason == "content_filter"


def test_text_without_blocked_matches_is_released_whole():
    stream = StopStringFilter(("STOP",), BLOCKED)
    out = "".join(stream.push(c) for c in "a sec of bad") + stream.flush()
    assert out == "a sec of " and stream.reason == "content_filter"
    stream = StopStringFilter(("STOP",), BLOCKED)
    out = "".join(stream.push(c) for c in "a sec, ba") + stream.flush()
    assert out == "a sec, ba" and not stream.stopped  # partial matches that never completed come out at the end
    stream = StopStringFilter(("STOP",), BLOCKED)
    assert stream.push("x STOP then bad") == "x " and stream.reason == "stop"  # whichever comes first


def test_the_earliest_of_several_blocked_matches_in_one_delta_wins():
    """Found by the property test above: a later pattern's match used to cut after an earlier one's."""
    stream = StopStringFilter((), BLOCKED)
    assert stream.push("badsecret") == "" and stream.reason == "content_filter"
    stream = StopStringFilter(("sec",), ("bad",))
    assert stream.push("x badsecret") == "x " and stream.reason == "content_filter"

