"""The GGUF importer on tiny files written like llama.cpp writes them."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxchat.checkpoints.gguf_import import load_gguf
from flaxchat.model.transformer import Transformer, init_cache
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model

PROMPT = [5, 40, 300, 17, 17, 9, 250, 3, 100, 64, 7]


def _our_logits(imported):
    cfg = imported.cfg
    logits, _ = Transformer(cfg).apply({"params": imported.params}, jnp.asarray([PROMPT]),
                                       jnp.arange(len(PROMPT))[None], init_cache(cfg, 1, 16))
    return np.asarray(logits[0])


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("llama3_rope_tied", "llama"), ("qwen2", "qwen2")])
def test_f32_gguf_matches_torch_model(tmp_path, kind, arch):
    """Unpermuting llama.cpp's q/k rows (and reading llama3 ``rope_freqs``) must give back the HF model."""
    torch_model = make_tiny_model(kind, tmp_path / "hf")
    imported = load_gguf(write_gguf(torch_model, tmp_path / "tiny.gguf", arch=arch))
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(_our_logits(imported) - reference).max() <= 1e-4
    assert imported.cfg.tie_word_embeddings == torch_model.config.tie_word_embeddings


@pytest.mark.parametrize("kind,arch", [("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe"), ("mixtral", "llama")])
def test_a_mixture_of_experts_gguf_matches_torch_model(tmp_path, kind, arch):
    """Experts stacked per projection (``ffn_*_exps``), the router, Qwen2-MoE's shared expert and its 1-D gate,
    and Mixtral written as ``llama`` with experts (q/k rows permuted): the HF model's logits back."""
    torch_model = make_tiny_model(kind, tmp_path / "hf")
    imported = load_gguf(write_gguf(torch_model, tmp_path / "tiny.gguf", arch=arch))
    assert imported.cfg.architecture == kind and imported.cfg.num_experts == 4
    assert imported.cfg.norm_topk_prob == (kind != "qwen2_moe")  # llama.cpp's choice, and these configs'
    assert imported.cfg.shared_expert_intermediate_size == (96 if kind == "qwen2_moe" else 0)
    with torch.no_grad():
        reference = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(_our_logits(imported) - reference).max() <= 1e-4


def test_q8_0_gguf_matches_transformers_gguf_loader(tmp_path):
    from transformers import AutoModelForCausalLM

    torch_model = make_tiny_model("llama", tmp_path / "hf")
    path = write_gguf(torch_model, tmp_path / "tiny-q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    imported = load_gguf(path)
    reference_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        reference = reference_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(_our_logits(imported) - reference).max() <= 1e-4


def test_gguf_tokenizer_and_template(tmp_path):
    from flaxchat.model.tokenizer import HFTokenizer, SpecialTokens

    torch_model = make_tiny_model("llama", tmp_path / "hf")
    imported = load_gguf(write_gguf(torch_model, tmp_path / "tiny.gguf"))
    tokenizer = HFTokenizer.from_json(imported.tokenizer_files["tokenizer.json"].decode(), SpecialTokens())
    text = "<|im_start|>user\nthe heat é 😀<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids[-1] == 2  # specials stay whole
    assert tokenizer.decode(ids) == text
    assert imported.tokenizer_config["bos_token"] == "<|im_start|>"
    assert imported.tokenizer_config["eos_token"] == "<|im_end|>"
    assert "im_start" in imported.tokenizer_config["chat_template"]
