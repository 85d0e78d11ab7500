"""Write tiny GGUF files the way llama.cpp's converter does (q/k rows permuted for ``llama``)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from flaxchat.model.tokenizer import BYTE_TO_UNICODE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def toy_byte_level_vocab(size: int, extra: tuple[str, ...] = ()) -> tuple[list[str], list[int], list[str]]:
    """Specials, ``extra`` added tokens (matched whole, not special, like Qwen's ``<think>``), the 256 byte
    symbols, then merged pairs of common letters up to ``size`` tokens."""
    tokens = SPECIALS + list(extra) + [BYTE_TO_UNICODE[b] for b in range(256)]
    types = [3] * len(SPECIALS) + [4] * len(extra) + [1] * 256
    merges = []
    for a in "Ġetaoinshr":
        for b in "etaoinshrd":
            if len(tokens) >= size:
                break
            tokens.append(a + b)
            types.append(1)
            merges.append(f"{a} {b}")
    return tokens, types, merges


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py): half-split rotary rows -> interleaved."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(
    model: torch.nn.Module,
    path: Path,
    arch: str = "llama",
    quant: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    architecture_name: str | None = None,
    drop: tuple[str, ...] = (),
    extra_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write an HF torch model as GGUF; 2-D weights are stored as ``quant`` (norms stay F32)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture_name or arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:  # as convert_hf_to_gguf.py writes a mixture of experts
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, types, merges = toy_byte_level_vocab(cfg.vocab_size, extra_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(chat_template)

    def add(name: str, tensor: torch.Tensor) -> None:
        if name in drop:
            return
        array = tensor.detach().numpy().astype(np.float32)
        if array.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(array, quant)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=quant)
        else:
            writer.add_tensor(name, array)

    state = model.state_dict()
    if cfg.rope_parameters.get("rope_type") == "llama3":
        # llama.cpp stores llama3 scaling as per-frequency divisors of the unscaled inverse frequencies.
        dim = cfg.hidden_size // cfg.num_attention_heads
        base = 1.0 / (cfg.rope_parameters["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        writer.add_tensor("rope_freqs.weight", (base / model.model.rotary_emb.inv_freq.numpy()).astype(np.float32))
    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_suffix, gguf_suffix in _NAMES.items():
            key = f"model.layers.{i}.{hf_suffix}"
            if key not in state:
                continue
            tensor = state[key]
            if arch == "llama" and hf_suffix == "self_attn.q_proj.weight":
                tensor = torch.from_numpy(llama_permute(tensor.numpy(), cfg.num_attention_heads))
            elif arch == "llama" and hf_suffix == "self_attn.k_proj.weight":
                tensor = torch.from_numpy(llama_permute(tensor.numpy(), cfg.num_key_value_heads))
            add(f"blk.{i}.{gguf_suffix}", tensor)
        if experts:
            _add_experts(add, state, i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_experts(add, state: dict, layer: int) -> None:
    """Layer ``layer``'s router, stacked experts (``[experts, out, in]``: transformers keeps gate and up fused
    as ``gate_up_proj``, gate first) and, for Qwen2-MoE, its shared expert and that expert's 1-D gate."""
    prefix = next(key.rsplit(".experts.", 1)[0] for key in state
                  if key.startswith(f"model.layers.{layer}.") and ".experts." in key)
    add(f"blk.{layer}.ffn_gate_inp.weight", state[f"{prefix}.gate.weight"])
    gate, up = state[f"{prefix}.experts.gate_up_proj"].chunk(2, dim=1)
    add(f"blk.{layer}.ffn_gate_exps.weight", gate)
    add(f"blk.{layer}.ffn_up_exps.weight", up)
    add(f"blk.{layer}.ffn_down_exps.weight", state[f"{prefix}.experts.down_proj"])
    if f"{prefix}.shared_expert_gate.weight" in state:
        for proj in ("gate", "up", "down"):
            add(f"blk.{layer}.ffn_{proj}_shexp.weight", state[f"{prefix}.shared_expert.{proj}_proj.weight"])
        add(f"blk.{layer}.ffn_gate_inp_shexp.weight", state[f"{prefix}.shared_expert_gate.weight"].reshape(-1))
