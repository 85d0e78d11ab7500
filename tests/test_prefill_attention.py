"""The prefill-attention kernel against the XLA formulation, and a query row's independence of how the
prompt was cut into chunks and of the other rows (what lets the prefix cache reuse prefill's KV blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.model import kernels
from flaxchat.model.attention import _blockwise, _prefill_kernel
from tests.test_decode_attention import DIM, GROUPS, KV, LAYER, SLOTS, caches

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.build_error()}")

SEQ = 40  # positions per row: the kernel's work items of 16 positions, the last one short
STARTS = np.array([0, 300, 17, 471])  # 471 + 40 = 511: the chunk ends at the cache's last position
ROWS = jnp.asarray([1, 5, SLOTS, 0], jnp.int32)  # SLOTS: a padding row
LIVE = np.asarray(ROWS) < SLOTS

kernel = jax.jit(_prefill_kernel, static_argnums=6)


def queries(seed, seq=SEQ):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((len(STARTS), KV, GROUPS * seq, DIM)) * DIM**-0.5, jnp.float32)


def positions(first=0, last=SEQ):
    return jnp.asarray(STARTS[:, None] + np.arange(first, last)[None], jnp.int32)


def chunk(q, first, last):
    """Positions [first, last) of every row's queries (q is group-major: row g * SEQ + t)."""
    parts = np.asarray(q).reshape(q.shape[0], KV, GROUPS, SEQ, DIM)[:, :, :, first:last]
    return jnp.asarray(parts.reshape(q.shape[0], KV, GROUPS * (last - first), DIM))


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("window", [0, 100])
def test_kernel_matches_the_blockwise_softmax(kv_dtype, window):
    cache, q, window = caches(kv_dtype, np.random.default_rng(0)), queries(1), jnp.int32(window)
    out = np.asarray(kernel(q, cache, LAYER, ROWS, positions(), window, GROUPS))
    xla = jax.jit(lambda *a: _blockwise(*a, GROUPS)[0])(q, cache, LAYER, ROWS, positions(), window)
    np.testing.assert_allclose(out[LIVE], np.asarray(xla)[LIVE], rtol=2e-5, atol=2e-6)
    assert np.all(out[~LIVE] == 0)
    # The layer is addressed inside the stack: the same bits as a cache holding that layer alone.
    alone = kernel(q, jax.tree.map(lambda a: a[2:3], cache), jnp.int32(0), ROWS, positions(), window, GROUPS)
    assert np.array_equal(np.asarray(alone), out)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("window", [0, 100])
def test_a_rows_bits_do_not_depend_on_the_chunking_or_the_other_rows(kv_dtype, window):
    cache, q, window = caches(kv_dtype, np.random.default_rng(2)), queries(3), jnp.int32(window)
    whole = np.asarray(kernel(q, cache, LAYER, ROWS, positions(), window, GROUPS))
    for cut in (1, 5, 16, 23):  # inside and at the kernel's work items of 16 positions
        parts = [np.asarray(kernel(chunk(q, a, b), cache, LAYER, ROWS, positions(a, b), window, GROUPS))
                 for a, b in ((0, cut), (cut, SEQ))]
        assert np.array_equal(np.concatenate(parts, axis=1)[LIVE], whole[LIVE]), cut
    for b in range(len(STARTS)):
        alone = kernel(q[b:b + 1], cache, LAYER, ROWS[b:b + 1], positions()[b:b + 1], window, GROUPS)
        assert np.array_equal(np.asarray(alone)[0], whole[b]), b


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_positions_past_a_rows_length_are_not_computed(kv_dtype):
    """``lengths`` [B]: a row's real positions (a bucket's padding follows them). The real ones keep the bits
    of a call that computes every position; the rest come out zero."""
    cache, q, window = caches(kv_dtype, np.random.default_rng(4)), queries(5), jnp.int32(0)
    whole = np.asarray(kernel(q, cache, LAYER, ROWS, positions(), window, GROUPS))
    lengths = np.array([25, 0, 40, 16], np.int32)
    out = np.asarray(kernel(q, cache, LAYER, ROWS, positions(), window, GROUPS, jnp.asarray(lengths)))
    real = np.arange(SEQ)[None] < lengths[:, None]  # [B, T] (the output is [B, T, H, D])
    assert np.array_equal(out[real & LIVE[:, None]], whole[real & LIVE[:, None]])
    assert np.all(out[~real] == 0)
