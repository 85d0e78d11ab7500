"""The attention kernel on decode steps (one query position per row) against the XLA formulation, and its
rows' independence of the other rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.model import kernels
from flaxchat.model.attention import _blockwise, _prefill_kernel as _decode_kernel
from flaxchat.model.kv_cache import SCALE_GROUP, KVCache, dequantize_entries, quantize_entries, storage_dtype, to_storage

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.build_error()}")

LAYERS, SLOTS, KV, GROUPS, DIM, LENGTH = 3, 6, 2, 3, 64, 512
LAYER = jnp.int32(2)  # the caches are every layer's: the kernel must read this one's
NO_WINDOW = jnp.int32(0)


def caches(kv_dtype, rng):
    """Every layer's random keys and values, stored as ``kv_dtype`` caches are."""
    shape = (LAYERS, SLOTS, KV, LENGTH, DIM)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    if kv_dtype == "int8":
        (k, k_scale), (v, v_scale) = quantize_entries(k), quantize_entries(v)
        return KVCache(k, v, k_scale, v_scale)
    stored = storage_dtype(kv_dtype)
    return KVCache(to_storage(k, stored), to_storage(v, stored))


def inputs(kv_dtype, seed=0):
    rng = np.random.default_rng(seed)
    cache = caches(kv_dtype, rng)
    q = jnp.asarray(rng.standard_normal((5, KV, GROUPS, DIM)) * DIM**-0.5, jnp.float32)
    rows = jnp.asarray([3, 0, 5, SLOTS, 1], jnp.int32)  # SLOTS: a padding row
    positions = jnp.asarray([[0], [130], [511], [0], [257]], jnp.int32)
    return q, cache, rows, positions


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("window", [0, 100])
def test_kernel_matches_the_blockwise_softmax(kv_dtype, window):
    q, cache, rows, positions = inputs(kv_dtype)
    window = jnp.int32(window)
    kernel = jax.jit(_decode_kernel, static_argnums=6)(q, cache, LAYER, rows, positions, window, GROUPS)
    xla = jax.jit(lambda *a: _blockwise(*a, GROUPS)[0])(q, cache, LAYER, rows, positions, window)
    live = np.asarray(rows) < SLOTS
    np.testing.assert_allclose(np.asarray(kernel)[live], np.asarray(xla)[live], rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(kernel)[~live] == 0)
    # The layer is addressed inside the stack: the same bits as a cache holding that layer alone.
    alone = jax.jit(_decode_kernel, static_argnums=6)(q, jax.tree.map(lambda a: a[2:3], cache), jnp.int32(0), rows,
                                                      positions, window, GROUPS)
    assert np.array_equal(np.asarray(alone), np.asarray(kernel))


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_a_rows_bits_do_not_depend_on_the_other_rows(kv_dtype):
    q, cache, rows, positions = inputs(kv_dtype, seed=1)
    run = jax.jit(_decode_kernel, static_argnums=6)
    full = np.asarray(run(q, cache, LAYER, rows, positions, NO_WINDOW, GROUPS))
    for b in range(q.shape[0]):
        alone = np.asarray(run(q[b:b + 1], cache, LAYER, rows[b:b + 1], positions[b:b + 1], NO_WINDOW, GROUPS))
        assert np.array_equal(alone[0], full[b]), b
    order = np.array([4, 2, 0, 1, 3])
    shuffled = np.asarray(run(q[order], cache, LAYER, rows[order], positions[order], NO_WINDOW, GROUPS))
    assert np.array_equal(shuffled, full[order])


def test_int8_entries_hold_each_vector_to_within_half_a_step():
    """Each key/value vector is quantised on its own (absmax / 127 per group of SCALE_GROUP elements): every
    element comes back within half a quantisation step of its group, and a vector's codes do not depend on
    its neighbours."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 7, DIM)) * np.array([1e-3, 1, 30, 0])[:, None, None],
                    jnp.float32)
    x = x.at[1, 2, 5].set(40.0)  # an outlier costs precision in its own group only
    codes, scale = quantize_entries(x)
    assert scale.shape == (4, 7, DIM // SCALE_GROUP)
    step = np.repeat(np.asarray(scale), SCALE_GROUP, axis=-1)
    assert np.all(np.abs(np.asarray(dequantize_entries(codes, scale)) - np.asarray(x)) <= step / 2 + 1e-12)
    assert np.asarray(scale)[1, 2, 1] < np.asarray(scale)[1, 2, 0] / 10
    assert np.all(np.asarray(scale)[3] == 0) and np.all(np.asarray(codes)[3] == 0)  # an all-zero vector
    alone, _ = quantize_entries(x[1:2, 3:4])
    assert np.array_equal(np.asarray(alone)[0, 0], np.asarray(codes)[1, 3])
