"""Quantised weights (8- and 4-bit blocks): the block format round-trips, the CPU kernel computes the
product, and its rows never depend on the other rows of the call (the property decode buckets and prefill
chunks rely on)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.model import kernels
from flaxchat.model.quant import (BLOCK, _xla_matmul, block_matmul, columns, exactly_4_bit, quantize_blocks,
                         quantize_params, resolve_weights)

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel not built: {kernels.build_error()}")


def one_code_per_byte(codes: np.ndarray) -> np.ndarray:
    """8-bit panels as they are; 4-bit panels ``[P, K, 16]`` (byte j: column j low, j + 16 high) unpacked."""
    codes = np.asarray(codes)
    if codes.shape[-1] == 32:
        return codes
    return np.concatenate([codes & 0x0F, codes >> 4], axis=-1)


def dense(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, features: int) -> np.ndarray:
    """The ``[K, N]`` float matrix the stored panels represent (numpy, independent of model/quant.py)."""
    codes = one_code_per_byte(codes)
    panels, k, width = codes.shape
    blocks = codes.reshape(panels, k // BLOCK, BLOCK, width).astype(np.float32)
    w = blocks * scale[:, :, None, :] + offset[:, :, None, :]
    return w.reshape(panels, k, width).transpose(1, 0, 2).reshape(k, panels * width)[:, :features]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k,n", [(64, 320), (96, 48), (576, 192)])
def test_blocks_round_trip_within_half_a_step(k, n, bits):
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    codes, scale, offset = quantize_blocks(w, bits)
    assert codes.dtype == np.uint8 and codes.shape == (-(-n // 32), k, 32 * bits // 8)
    assert one_code_per_byte(codes).max() == 2**bits - 1
    step = np.repeat(scale.transpose(1, 0, 2).reshape(k // BLOCK, -1)[:, :n], BLOCK, axis=0)
    assert np.all(np.abs(dense(codes, scale, offset, n) - w) <= step / 2 * (1 + 1e-5) + 1e-9)


def test_a_4_bit_grid_is_represented_almost_exactly():
    """Blocks whose values lie on a 16-level grid (the default model's Q4_1 weights) come back within a
    few float32 ulps: 255 = 15 x 17, so every grid level is an 8-bit code."""
    rng = np.random.default_rng(1)
    d = rng.uniform(0.001, 0.01, size=(2, 1, 64)).astype(np.float32)
    m = rng.uniform(-0.05, 0.0, size=(2, 1, 64)).astype(np.float32)
    q = rng.integers(0, 16, size=(2, BLOCK, 64)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # each block spans the whole grid, as Q4_1 quantisation makes it
    w = (d * q + m).reshape(2 * BLOCK, 64)
    back = dense(*quantize_blocks(w), 64)
    np.testing.assert_allclose(back, w, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(w).max())


def _q4_grid(seed: int, k: int, n: int) -> np.ndarray:
    """Weights as a Q4_1 file holds them: per block of 32, ``d * q + m`` with float16 ``d``, ``m``."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.001, 0.01, size=(k // BLOCK, 1, n)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.05, 0.0, size=(k // BLOCK, 1, n)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, size=(k // BLOCK, BLOCK, n)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # each block spans the whole grid, as Q4_1 quantisation makes it
    return (d * q + m).reshape(k, n)


def test_4_bit_blocks_hold_a_4_bit_checkpoint_exactly_and_auto_picks_them():
    """A Q4-style weight matrix comes back bit for bit from 4-bit blocks (so ``auto`` runs such a checkpoint
    as int4, losing nothing); trained-like float weights do not, and ``auto`` keeps 8 bits for them."""
    w = _q4_grid(7, 96, 80)
    assert exactly_4_bit(w)
    np.testing.assert_array_equal(dense(*quantize_blocks(w, 4), 80), w)
    floats = np.random.default_rng(8).standard_normal((96, 80)).astype(np.float32)
    assert not exactly_4_bit(floats)

    from flaxchat.model.config import ModelConfig

    cfg = ModelConfig(architecture="llama", max_position_embeddings=64, vocab_size=320, hidden_size=64,
                      intermediate_size=160, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
    layers = {"mlp": {"up_proj": {"kernel": _q4_grid(1, 64, 160)[None]},  # stacked: [layers, in, out]
                      "down_proj": {"kernel": _q4_grid(2, 160, 64)[None]}}}
    params = {"layers": layers, "embed": {"embedding": floats[:, :64]}}  # the embedding is not a projection
    if not (kernels.available() and jax.default_backend() == "cpu"):
        pytest.skip("no kernel: auto is float32")
    assert resolve_weights("auto", cfg, params) == "int4"
    layers["mlp"]["down_proj"]["kernel"] = np.random.default_rng(9).standard_normal((1, 160, 64)).astype(np.float32)
    assert resolve_weights("auto", cfg, params) == "int8"
    quantised = quantize_params({"embed": {"embedding": floats[:, :64]},
                                 "layers": {"mlp": {"up_proj": {"kernel": np.stack([w[:, :64]] * 2)}}}}, "int4")
    codes = quantised["layers"]["mlp"]["up_proj"]["codes"]
    assert codes.shape[0] == 2 and codes.shape[-1] == 16  # projections: 4-bit, one matrix per layer
    np.testing.assert_array_equal(codes[0], quantize_blocks(w[:, :64], 4)[0])
    assert quantised["embed"]["codes"].shape[-1] == 32  # the embedding / tied LM head stays 8-bit


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k,n", [(64, 320), (96, 48), (576, 1536)])
def test_kernel_matches_the_dequantised_product(k, n, bits):
    rng = np.random.default_rng(n)
    codes, scale, offset = quantize_blocks(rng.standard_normal((k, n)).astype(np.float32) * 0.05, bits)
    w = dense(codes, scale, offset, n).astype(np.float64)
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = np.asarray(jax.jit(block_matmul, static_argnums=4)(jnp.asarray(x), codes, scale, offset, n))
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    # A stack of layers' matrices with the layer as an operand: the same bits as the matrix alone.
    others = quantize_blocks(rng.standard_normal((k, n)).astype(np.float32), bits)
    stacked = [jnp.asarray(np.stack([a, b, a[::-1].copy()])) for a, b in zip(others, (codes, scale, offset))]
    layered = jax.jit(block_matmul, static_argnums=4)(jnp.asarray(x), *stacked, n, jnp.int32(1))
    assert np.array_equal(np.asarray(layered), y)
    xla = np.asarray(_xla_matmul(jnp.asarray(x), *stacked, jnp.int32(1)))
    np.testing.assert_allclose(xla[:, :n], y, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("k,n", [(64, 320), (576, 1536)])
def test_int8_activations_stay_within_their_quantisation_error(k, n):
    """4-bit weights x activations quantised per block of 32 (absmax / 127): each output is within the
    activations' rounding (half a step per element, times |w|) of the float product."""
    rng = np.random.default_rng(k)
    codes, scale, offset = quantize_blocks(rng.standard_normal((k, n)).astype(np.float32) * 0.05, 4)
    w = dense(codes, scale, offset, n).astype(np.float64)
    x = rng.standard_normal((19, k)).astype(np.float32) * np.linspace(0.1, 10, k).astype(np.float32)
    product = jax.jit(functools.partial(block_matmul, int8_activations=True), static_argnums=4)
    y = np.asarray(product(jnp.asarray(x), codes, scale, offset, n))
    step = np.repeat(np.abs(x).reshape(19, -1, BLOCK).max(-1) / 127, BLOCK, axis=1)  # [rows, k]
    bound = (step / 2) @ np.abs(w) * (1 + 1e-3) + 1e-4 * np.abs(x.astype(np.float64) @ w) + 1e-4
    assert np.all(np.abs(y - x.astype(np.float64) @ w) <= bound)
    assert np.abs(y - x.astype(np.float64) @ w).max() > 0  # the integer path ran
    others = quantize_blocks(rng.standard_normal((k, n)).astype(np.float32), 4)
    stacked = [jnp.asarray(np.stack([a, b])) for a, b in zip(others, (codes, scale, offset))]
    assert np.array_equal(np.asarray(product(jnp.asarray(x), *stacked, n, jnp.int32(1))), y)


@needs_kernel
def test_calls_from_several_threads_at_once_give_the_bits_of_calls_alone():
    """The kernels share their work with one helper thread (model/kernels/parallel.h): calls made at the
    same time from four threads, of sizes that do and do not offer work to it, each get exactly what the
    same call gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    k, n = 576, 1536
    codes, scale, offset = (jnp.asarray(a) for a in quantize_blocks(rng.standard_normal((k, n)).astype(np.float32)))
    product = jax.jit(block_matmul, static_argnums=4)
    inputs = [jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32)) for rows in (1, 2, 3, 16, 1, 7)]
    alone = [np.asarray(product(x, codes, scale, offset, n)) for x in inputs]

    def hammer(worker: int) -> bool:
        return all(np.array_equal(np.asarray(product(inputs[i], codes, scale, offset, n)), alone[i])
                   for _ in range(40) for i in np.random.default_rng(worker).permutation(len(inputs)))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(hammer, range(4)))


@needs_kernel
@pytest.mark.parametrize("bits,int8_activations", [(8, False), (4, False), (4, True)])
def test_a_rows_bits_do_not_depend_on_the_other_rows(bits, int8_activations):
    """Row i of a call with M rows is bit-identical to row i of a 67-row call, for every M the engine
    might use (1..17, 64) and with different neighbours — with int8 activations (prompt chunks) too."""
    rng = np.random.default_rng(2)
    k, n = 576, 1536
    codes, scale, offset = (jnp.asarray(a) for a in quantize_blocks(rng.standard_normal((k, n)).astype(np.float32), bits))
    x = rng.standard_normal((67, k)).astype(np.float32)
    product = jax.jit(functools.partial(block_matmul, int8_activations=int8_activations), static_argnums=4)
    full = np.asarray(product(jnp.asarray(x), codes, scale, offset, n))
    for rows in [*range(1, 18), 64]:
        part = np.asarray(product(jnp.asarray(x[:rows]), codes, scale, offset, n))
        assert np.array_equal(part, full[:rows]), rows
    shuffled = np.asarray(product(jnp.asarray(x[::-1]), codes, scale, offset, n))
    assert np.array_equal(shuffled[::-1], full)


@needs_kernel
@pytest.mark.parametrize("bits,int8_activations", [(8, False), (4, False), (4, True)])
def test_padding_rows_are_skipped_and_valid_rows_keep_their_bits(bits, int8_activations):
    """``valid`` flags a bucket's real rows: those keep the bits of a call without padding, whether they
    lead the call (one prompt's chunk, a decode bucket: computed in place) or are scattered (a batched
    prefill's prompts: gathered and scattered back); the others come out zero (not computed)."""
    rng = np.random.default_rng(5)
    k, n = 576, 1536
    codes, scale, offset = (jnp.asarray(a) for a in quantize_blocks(rng.standard_normal((k, n)).astype(np.float32), bits))
    x = jnp.asarray(rng.standard_normal((64, k)).astype(np.float32))
    product = jax.jit(functools.partial(block_matmul, int8_activations=int8_activations), static_argnums=4)
    full = np.asarray(product(x, codes, scale, offset, n))
    patterns = {"leading 25": np.arange(64) < 25, "none": np.zeros(64, bool), "one": np.arange(64) == 0,
                "4 prompts of 16, 5 real each": np.arange(64) % 16 < 5, "every third": np.arange(64) % 3 == 0}
    for name, valid in patterns.items():
        out = np.asarray(product(x, codes, scale, offset, n, valid=jnp.asarray(valid)))
        assert np.array_equal(out[valid], full[valid]), name
        assert np.all(out[~valid] == 0), name


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_columns_are_the_tables_rows(bits):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((100, 64)).astype(np.float32)  # [V, H]; stored as W = table.T
    codes, scale, offset = quantize_blocks(table.T, bits)
    tokens = np.array([[0, 31, 32, 99]], np.int32)
    looked_up = np.asarray(columns(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(offset), jnp.asarray(tokens)))
    np.testing.assert_array_equal(looked_up[0], dense(codes, scale, offset, 100).T[tokens[0]])


def test_auto_weights_pick_int8_on_cpu_only_for_whole_blocks():
    from flaxchat.model.config import ModelConfig

    cfg = ModelConfig(architecture="llama", max_position_embeddings=64, vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    expected = "int8" if kernels.available() and jax.default_backend() == "cpu" else "float32"
    assert resolve_weights("auto", cfg) == expected
    assert resolve_weights("auto", cfg.replace(intermediate_size=170)) == "float32"
    assert resolve_weights("float32", cfg) == "float32"


def _python(code: str, env: dict) -> str:
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


CHECK_PRODUCT = """
import numpy as np, jax.numpy as jnp
from flaxchat.model import kernels
from flaxchat.model.quant import block_matmul, quantize_blocks
w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
codes, scale, offset = quantize_blocks(w)
y = np.asarray(block_matmul(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(offset), 48))
blocks = codes.reshape(2, 2, 32, 32).astype(np.float32) * scale[:, :, None, :] + offset[:, :, None, :]
dense = blocks.reshape(2, 64, 32).transpose(1, 0, 2).reshape(64, 64)[:, :48]
np.testing.assert_allclose(y, x @ dense, rtol=1e-5, atol=1e-5)
print(kernels.available(), kernels.build_error())
"""


@needs_kernel
def test_the_kernels_build_from_source_into_an_empty_cache(tmp_path):
    out = _python(CHECK_PRODUCT, {"FLAXCHAT_KERNEL_CACHE": str(tmp_path)})
    assert out == "True None"
    assert len(list(tmp_path.glob("flaxchat-kernels-*.so"))) == 1


def test_without_the_kernels_int8_falls_back_to_the_xla_product(tmp_path):
    out = _python(CHECK_PRODUCT, {"FLAXCHAT_NO_KERNELS": "1", "FLAXCHAT_KERNEL_CACHE": str(tmp_path)})
    assert out == "False disabled by FLAXCHAT_NO_KERNELS"
    assert not list(tmp_path.iterdir())


@needs_kernel
def test_a_fused_matrix_gives_each_part_the_bits_it_has_alone():
    """q/k/v and gate/up are stored as one matrix with int8 weights (one kernel call): each output column
    is quantised and computed on its own, so every part's bits equal its own product's."""
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal((96, n)).astype(np.float32) for n in (64, 48, 48)]
    x = jnp.asarray(rng.standard_normal((3, 96)).astype(np.float32))
    product = jax.jit(block_matmul, static_argnums=4)
    fused = np.asarray(product(x, *quantize_blocks(np.concatenate(parts, axis=1)), 160))
    alone = np.concatenate([np.asarray(product(x, *quantize_blocks(w), w.shape[1])) for w in parts], axis=1)
    assert np.array_equal(fused, alone)


def test_programs_for_another_backend_never_call_the_cpu_kernels(monkeypatch, tmp_path):
    """The kernels are registered for the CPU only: on a GPU or TPU backend the model must lower to the XLA
    formulation (a custom call to a CPU-only target would not compile there)."""
    from flaxchat.model.quant import prepare_weights
    from flaxchat.model.transformer import Transformer, init_cache
    from tests.engine_fixtures import tiny_model

    cfg, params, _ = tiny_model(tmp_path)
    cfg, params = prepare_weights(cfg, params, "int8")
    tokens = jnp.zeros((1, 4), jnp.int32)

    def lowered() -> str:
        return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, t, init_cache(cfg, 1, 8))[0]).lower(
            params, tokens).as_text()

    assert kernels.available() == ("flaxchat_" in lowered())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not kernels.available() and "flaxchat_" not in lowered()
