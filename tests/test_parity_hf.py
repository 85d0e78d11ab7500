"""Logits parity with transformers (PyTorch, float32, CPU) through the safetensors importer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxchat.checkpoints.hf_import import load_hf_folder
from flaxchat.model.transformer import Transformer, init_cache
from tests.hf_reference import TINY_MODELS, make_tiny_model

PROMPT = [3, 17, 250, 9, 41, 41, 100, 7, 2, 199, 64, 5, 88, 301, 12, 6]
TOLERANCE = 1e-4


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request, tmp_path):
    torch_model = make_tiny_model(request.param, tmp_path)
    cfg, params = load_hf_folder(tmp_path)
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    return cfg, params, reference


def test_prompt_logits_match(tiny):
    cfg, params, reference = tiny
    tokens = jnp.asarray([PROMPT], jnp.int32)
    positions = jnp.arange(len(PROMPT), dtype=jnp.int32)[None]
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, init_cache(cfg, 1, 32))
    diff = np.abs(np.asarray(logits[0]) - reference).max()
    assert diff <= TOLERANCE, f"max abs logits difference {diff}"


def test_cached_token_by_token_logits_match(tiny):
    """Prefill half the prompt, then feed one token at a time through the KV cache."""
    cfg, params, reference = tiny
    model = Transformer(cfg)
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c))
    cache = init_cache(cfg, 1, 32)
    half = len(PROMPT) // 2
    logits, cache = step(params, jnp.asarray([PROMPT[:half]]), jnp.arange(half)[None], cache)
    got = [np.asarray(logits[0])]
    for pos in range(half, len(PROMPT)):
        logits, cache = step(params, jnp.asarray([[PROMPT[pos]]]), jnp.asarray([[pos]]), cache)
        got.append(np.asarray(logits[0]))
    diff = np.abs(np.concatenate(got) - reference).max()
    assert diff <= TOLERANCE, f"max abs logits difference {diff}"


def test_bfloat16_compute_and_params(tmp_path):
    """bfloat16 storage + compute runs through prefill and cache and stays close to the float32 reference."""
    torch_model = make_tiny_model("qwen3", tmp_path)
    cfg, params = load_hf_folder(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    cache = init_cache(cfg, 1, 32)
    assert cache.dtype == jnp.bfloat16
    logits, cache = Transformer(cfg).apply({"params": params}, jnp.asarray([PROMPT]),
                                           jnp.arange(len(PROMPT))[None], cache)
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits[0]) - reference).max() <= 0.05 * np.abs(reference).max()


def _to_fp8_folder(torch_model, folder, block=(16, 32)):
    """``torch_model`` saved as an FP8 checkpoint the way DeepSeek-V3 and Qwen's -FP8 models are: each
    projection ``float8_e4m3fn`` with a ``weight_scale_inv`` per ``block`` (absmax / 448, here 16 x 32 so the
    tiny shapes have partial blocks), embeddings, norms and the LM head kept as they are; ``config.json``'s
    ``quantization_config`` names the block. Returns the float32 weights those codes stand for."""
    import json

    from safetensors.torch import save_file

    tensors, dequantised = {}, {}
    for name, weight in torch_model.state_dict().items():
        weight = weight.detach().to(torch.float32)
        if name.endswith("_proj.weight"):
            rows, cols = weight.shape
            padded = torch.nn.functional.pad(weight, (0, -cols % block[1], 0, -rows % block[0]))
            blocks = padded.reshape(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            factors = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
            codes = (weight / factors).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = codes, scale.contiguous()
            dequantised[name] = codes.to(torch.float32) * factors
        else:
            tensors[name] = weight.contiguous()
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config))
    return dequantised


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_an_fp8_checkpoint_imports_as_its_dequantised_weights(tmp_path, kind):
    """An FP8 block-scaled checkpoint (``float8_e4m3fn`` + ``weight_scale_inv``) imports by dequantising: the
    logits equal transformers' on the weights the codes stand for (within 1e-4)."""
    torch_model = make_tiny_model(kind, tmp_path)
    dequantised = _to_fp8_folder(torch_model, tmp_path)
    torch_model.load_state_dict(dequantised, strict=False)
    cfg, params = load_hf_folder(tmp_path)
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    logits, _ = Transformer(cfg).apply({"params": params}, jnp.asarray([PROMPT], jnp.int32),
                                       jnp.arange(len(PROMPT), dtype=jnp.int32)[None], init_cache(cfg, 1, 32))
    assert np.abs(np.asarray(logits[0]) - reference).max() <= TOLERANCE
    q = params["layers"]["attn"]["q_proj"]["kernel"][0]
    np.testing.assert_array_equal(q, dequantised["model.layers.0.self_attn.q_proj.weight"].numpy().T)


def test_fp8_scales_that_do_not_tile_the_weight_are_a_checkpoint_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from flaxchat.checkpoints.errors import CheckpointError

    _to_fp8_folder(make_tiny_model("llama", tmp_path), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight_scale_inv"
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="down_proj.weight.*do not tile"):
        load_hf_folder(tmp_path)
