"""The decode-attention kernel against the XLA formulation, and its rows' independence of the other rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import kernels
from model.attention import _blockwise, _decode_kernel
from model.kv_cache import to_storage, storage_dtype

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.build_error()}")

LAYERS, SLOTS, KV, GROUPS, DIM, LENGTH = 3, 6, 2, 3, 64, 512
LAYER = jnp.int32(2)  # the caches are every layer's: the kernel must read this one's
NO_WINDOW = jnp.int32(0)


def inputs(kv_dtype, seed=0):
    rng = np.random.default_rng(seed)
    shape = (LAYERS, SLOTS, KV, LENGTH, DIM)
    stored = storage_dtype(kv_dtype)
    cache_k = to_storage(jnp.asarray(rng.standard_normal(shape), jnp.float32), stored)
    cache_v = to_storage(jnp.asarray(rng.standard_normal(shape), jnp.float32), stored)
    q = jnp.asarray(rng.standard_normal((5, KV, GROUPS, DIM)) * DIM**-0.5, jnp.float32)
    rows = jnp.asarray([3, 0, 5, SLOTS, 1], jnp.int32)  # SLOTS: a padding row
    positions = jnp.asarray([[0], [130], [511], [0], [257]], jnp.int32)
    return q, cache_k, cache_v, rows, positions


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [0, 100])
def test_kernel_matches_the_blockwise_softmax(kv_dtype, window):
    q, cache_k, cache_v, rows, positions = inputs(kv_dtype)
    window = jnp.int32(window)
    kernel = jax.jit(_decode_kernel, static_argnums=7)(q, cache_k, cache_v, LAYER, rows, positions, window, GROUPS)
    xla = jax.jit(lambda *a: _blockwise(*a, GROUPS)[0])(q, cache_k, cache_v, LAYER, rows, positions, window)
    live = np.asarray(rows) < SLOTS
    np.testing.assert_allclose(np.asarray(kernel)[live], np.asarray(xla)[live], rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(kernel)[~live] == 0)
    # The layer is addressed inside the stack: the same bits as a cache holding that layer alone.
    alone = jax.jit(_decode_kernel, static_argnums=7)(q, cache_k[2:3], cache_v[2:3], jnp.int32(0), rows, positions,
                                                      window, GROUPS)
    assert np.array_equal(np.asarray(alone), np.asarray(kernel))


def test_a_rows_bits_do_not_depend_on_the_other_rows():
    q, cache_k, cache_v, rows, positions = inputs("bfloat16", seed=1)
    run = jax.jit(_decode_kernel, static_argnums=7)
    full = np.asarray(run(q, cache_k, cache_v, LAYER, rows, positions, NO_WINDOW, GROUPS))
    for b in range(q.shape[0]):
        alone = np.asarray(run(q[b:b + 1], cache_k, cache_v, LAYER, rows[b:b + 1], positions[b:b + 1], NO_WINDOW,
                               GROUPS))
        assert np.array_equal(alone[0], full[b]), b
    order = np.array([4, 2, 0, 1, 3])
    shuffled = np.asarray(run(q[order], cache_k, cache_v, LAYER, rows[order], positions[order], NO_WINDOW, GROUPS))
    assert np.array_equal(shuffled, full[order])
