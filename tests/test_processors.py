"""Logit processors against transformers' processors/warpers on random logits (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flaxchat.sampling import processors as P
from flaxchat.sampling.sampler import choice_key, request_key

VOCAB = 37
# XLA:CPU flushes subnormal floats to zero, so logits like 9e-44 would tie with 0 there but not in torch.
finite_logits = st.floats(-20, 20, width=32, allow_subnormal=False)
logit_rows = arrays(np.float32, (3, VOCAB), elements=finite_logits)
# Sorting-based filters break ties in an implementation-defined order; compare them on distinct logits.
distinct_logit_rows = arrays(np.float32, (3, VOCAB), elements=finite_logits, unique=True)
SETTINGS = settings(max_examples=60, deadline=None)


def _per_row(reference_for, logits, values, input_ids=None):
    rows = []
    for i, value in enumerate(values):
        ids = torch.tensor([input_ids[i]]) if input_ids is not None else torch.zeros((1, 1), dtype=torch.long)
        rows.append(reference_for(value)(ids, torch.tensor(logits[i : i + 1])).numpy()[0])
    return np.stack(rows)


def _assert_same(ours, theirs):
    ours = np.asarray(ours)
    assert np.array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def _check_warper(ours, reference, logits, values, dtype=jnp.float32):
    """One transformers warper per row (scalar settings) vs ours on the whole batch (per-row arrays)."""
    _assert_same(ours(jnp.asarray(logits), jnp.asarray(values, dtype)), _per_row(reference, logits, values))


@SETTINGS
@given(logit_rows, st.lists(st.floats(0.05, 3.0), min_size=3, max_size=3))
def test_temperature(logits, temperatures):
    _check_warper(P.apply_temperature, TemperatureLogitsWarper, logits, temperatures)


@SETTINGS
@given(logit_rows, st.lists(st.integers(1, VOCAB), min_size=3, max_size=3))
def test_top_k(logits, ks):
    _check_warper(P.top_k_mask, TopKLogitsWarper, logits, ks, jnp.int32)


@SETTINGS
@given(distinct_logit_rows, st.lists(st.floats(0.01, 0.99), min_size=3, max_size=3))
def test_top_p(logits, ps):
    _check_warper(P.top_p_mask, TopPLogitsWarper, logits, ps)


@SETTINGS
@given(logit_rows, st.lists(st.floats(0.01, 0.99), min_size=3, max_size=3))
def test_min_p(logits, ps):
    _check_warper(P.min_p_mask, MinPLogitsWarper, logits, ps)


@SETTINGS
@given(logit_rows, st.lists(st.floats(1.0, 2.5), min_size=3, max_size=3),
       st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), min_size=3, max_size=3))
def test_repetition_penalty(logits, penalties, histories):
    width = max(map(len, histories))
    padded = [h + [h[0]] * (width - len(h)) for h in histories]  # repeats do not change the seen set
    theirs = _per_row(RepetitionPenaltyLogitsProcessor, logits, penalties, padded)
    seen = np.zeros((3, VOCAB), bool)
    for i, history in enumerate(histories):
        seen[i, history] = True
    ours = P.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.asarray(penalties, jnp.float32))
    _assert_same(ours, theirs)


@SETTINGS
@given(logit_rows, arrays(np.int32, (3, VOCAB), elements=st.integers(0, 5)),
       st.lists(st.floats(-2, 2), min_size=3, max_size=3), st.lists(st.floats(-2, 2), min_size=3, max_size=3))
def test_presence_frequency_openai_formula(logits, counts, presence, frequency):
    ours = P.apply_presence_frequency(jnp.asarray(logits), jnp.asarray(counts),
                                      jnp.asarray(presence, jnp.float32), jnp.asarray(frequency, jnp.float32))
    expected = logits - counts * np.float32(frequency)[:, None] - (counts > 0) * np.float32(presence)[:, None]
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(logit_rows, arrays(bool, (3, VOCAB)))
def test_allowed_bitmask(logits, allowed):
    words = np.zeros((3, (VOCAB + 31) // 32), np.uint32)
    for row, token in zip(*np.nonzero(allowed)):
        words[row, token // 32] |= np.uint32(1) << np.uint32(token % 32)
    ours = np.asarray(P.apply_allowed_bitmask(jnp.asarray(logits), jnp.asarray(words)))
    assert np.array_equal(~np.isneginf(ours), allowed)
    assert np.array_equal(ours[allowed], logits[allowed])


@settings(max_examples=12, deadline=None)
@given(st.lists(st.floats(0.05, 0.99), min_size=3, max_size=3), st.lists(st.integers(1, 3000), min_size=3, max_size=3),
       st.integers(0, 2**31 - 1), st.floats(0.2, 8.0))
def test_large_vocab_candidate_paths_match_transformers(ps, ks, seed, scale):
    """With a 4096-token vocabulary top-k/top-p take the top-candidates path (or fall back to the full
    sort when k or the nucleus exceeds the candidates); either way they match transformers."""
    logits = np.random.default_rng(seed).normal(scale=scale, size=(3, 4096)).astype(np.float32)
    _check_warper(P.top_p_mask, TopPLogitsWarper, logits, ps)
    _check_warper(P.top_k_mask, TopKLogitsWarper, logits, ks, jnp.int32)


def test_neutral_values_change_nothing():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, VOCAB)).astype(np.float32))
    ones, zeros = jnp.ones(2), jnp.zeros(2)
    out = P.top_k_mask(logits, jnp.zeros(2, jnp.int32))
    out = P.top_p_mask(out, ones)
    out = P.min_p_mask(out, zeros)
    out = P.apply_repetition_penalty(out, jnp.ones((2, VOCAB), bool), ones)
    out = P.apply_presence_frequency(out, jnp.ones((2, VOCAB), jnp.int32), zeros, zeros)
    out = P.apply_temperature(out, zeros)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logits))


def test_two_level_draws_follow_the_softmax():
    """200,000 draws over a 3,000-token vocabulary (three draw blocks, the last one padded) against
    softmax: a chi-square statistic near its degrees of freedom, and masked tokens never drawn."""
    import jax

    vocab, draws = 3000, 200_000
    logits = np.random.default_rng(1).standard_normal(vocab).astype(np.float32)
    logits[::7] = -np.inf
    keys = jax.random.split(jax.random.key(1), draws)
    draw = jax.jit(lambda k: P.categorical(k, jnp.broadcast_to(jnp.asarray(logits), (k.shape[0], vocab))))
    tokens = np.concatenate([np.asarray(draw(keys[i: i + 10_000])) for i in range(0, draws, 10_000)])  # 0.12 GB each
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[::7].sum() == 0
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    live = p > 0
    expected = p[live] * draws
    chi2 = (((counts[live] - expected) ** 2) / expected).sum()
    dof = live.sum() - 1
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof), (chi2, dof)  # 5 standard deviations of chi2(dof)


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    import jax

    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((16, 49152)).astype(np.float32) * 3)
    keys = jax.random.split(jax.random.key(3), 16)
    together = np.asarray(jax.jit(P.categorical)(keys, logits))
    for size in (1, 2, 5, 8):
        alone = np.asarray(jax.jit(P.categorical)(keys[:size], logits[:size]))
        assert np.array_equal(alone, together[:size]), size
    assert len(set(together.tolist())) > 8  # distinct rows draw distinct tokens


def test_a_rows_sample_is_the_same_whichever_rules_the_other_rows_switch_on():
    """``sample`` runs a rule (penalties, the constraint mask, min_p, the draw, the argmax) only when some row
    needs it; a row's token and logprobs must not depend on whether its neighbours made the rule run."""
    import jax

    from flaxchat.sampling.params import ALL_ALLOWED
    from flaxchat.sampling.sampler import RowSettings, sample

    vocab, rows = 4096, 4
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.standard_normal((rows, vocab)).astype(np.float32) * 3)
    keys = jax.random.split(jax.random.key(5), rows)
    allowed = np.full((rows, vocab // 32), ALL_ALLOWED, np.uint32)
    allowed[1, : vocab // 64] = 0  # row 1: half the vocabulary masked
    settings = RowSettings(
        temperature=jnp.asarray([0.7, 0.0, 1.3, 0.7]), top_p=jnp.asarray([1.0, 1.0, 0.9, 1.0]),
        top_k=jnp.asarray([0, 0, 50, 0], jnp.int32), min_p=jnp.asarray([0.0, 0.0, 0.05, 0.0]),
        presence=jnp.asarray([0.0, 0.5, 0.0, 0.0]), frequency=jnp.asarray([0.0, 0.0, 0.3, 0.0]),
        repetition=jnp.asarray([1.0, 1.2, 1.0, 1.0]), bias=jnp.zeros((rows, vocab)), allowed=jnp.asarray(allowed),
        counts=jnp.asarray(rng.integers(0, 3, (rows, vocab)), jnp.int32),
        seen=jnp.asarray(rng.random((rows, vocab)) < 0.1), top_logprobs=jnp.asarray([0, 3, 0, 0], jnp.int32))
    together = jax.jit(sample)(logits, settings, keys)
    for row in (0, 3):  # neutral rows: every rule off
        alone = jax.jit(sample)(logits[row : row + 1], jax.tree.map(lambda a: a[row : row + 1], settings),
                                keys[row : row + 1])
        assert int(alone.tokens[0]) == int(together.tokens[row])
        assert np.float32(alone.logprobs[0]).tobytes() == np.float32(together.logprobs[row]).tobytes()
    # the rules did run for the other rows: the greedy row's token is its masked, penalised argmax
    assert int(together.tokens[1]) >= vocab // 2


@pytest.mark.parametrize("seed,choice", [(0, 0), (7, 3), (2**32 + 1, 1), (2**64 - 1, 127)])
def test_a_choice_key_is_the_request_key_folded_with_the_choice_index(seed, choice):
    """choice_key runs as one jitted call; its bits are the eager definition's."""
    expected = jax.random.fold_in(request_key(seed), choice)
    assert np.array_equal(jax.random.key_data(choice_key(seed, choice)), jax.random.key_data(expected))


def _nucleus_size(row: np.ndarray, p: float) -> int:
    probs = np.sort(np.exp(row - row.max()) / np.exp(row - row.max()).sum())[::-1]
    return int(np.searchsorted(np.cumsum(probs), p) + 1)


def test_top_p_takes_the_smallest_candidate_stage_that_holds_each_row():
    """A 16,384-token vocabulary whose rows' nuclei need the 1,024 candidates, the 8,192 ones and the full
    sort: each matches transformers, and each row's mask is the same alone as beside the others (a row never
    takes a wider stage because another row needed one)."""
    rng = np.random.default_rng(3)
    logits = np.stack([rng.normal(scale=s, size=16384) for s in (6.0, 1.5, 0.05)]).astype(np.float32)
    ps = [0.9, 0.9, 0.9]
    sizes = [_nucleus_size(row, p) for row, p in zip(logits, ps)]
    assert sizes[0] <= P.TOP_P_STAGES[0] < sizes[1] <= P.TOP_P_STAGES[1] < sizes[2], sizes
    _check_warper(P.top_p_mask, TopPLogitsWarper, logits, ps)
    together = np.asarray(P.top_p_mask(jnp.asarray(logits), jnp.asarray(ps, jnp.float32)))
    for i in range(3):
        alone = np.asarray(P.top_p_mask(jnp.asarray(logits[i:i + 1]), jnp.asarray(ps[i:i + 1], jnp.float32)))
        assert np.array_equal(alone[0], together[i]), i
