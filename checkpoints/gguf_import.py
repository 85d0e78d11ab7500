"""Import a GGUF file (llama.cpp's format): metadata -> ModelConfig, tensors -> params, vocab -> tokenizer.

Mixtures of experts (``qwen2moe``, ``qwen3moe``, and ``llama`` with experts: Mixtral) keep each layer's
experts stacked in one tensor per projection; they are served as the per-expert HF names the layout asks for.

Quantised tensors are dequantised to float32 with ``gguf.quants.dequantize``. llama.cpp stores the
q/k projection rows of ``llama`` models permuted for its interleaved rotary layout; we undo that
permutation (as transformers' GGUF loader does) because our rotary embedding uses the HF half-split layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from flaxchat.checkpoints.errors import CheckpointError, first_line
from flaxchat.checkpoints.layout import assemble_params
from flaxchat.checkpoints.tokenizer_files import byte_level_bpe_json, sentencepiece_proto
from flaxchat.model.config import ModelConfig, RopeScaling, UnsupportedModelError

_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                  "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # llama with experts: Mixtral
_MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# A mixture of experts' tensors under the HF names ``checkpoints/layout.py`` asks for (Qwen's ``mlp.*``,
# Mixtral's ``block_sparse_moe.*``) -> llama.cpp's: the router, every expert's projection as one row of a
# stacked ``[experts, out, in]`` tensor, Qwen2-MoE's shared expert and its gate.
_MOE_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(.+)\.weight$")
_EXPERT_PATTERN = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)$")
_EXPERT_STACKS = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps",
                  "w3": "ffn_up_exps", "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
_MOE_SINGLES = {"gate": "ffn_gate_inp", "shared_expert.gate_proj": "ffn_gate_shexp",
                "shared_expert.up_proj": "ffn_up_shexp", "shared_expert.down_proj": "ffn_down_shexp",
                "shared_expert_gate": "ffn_gate_inp_shexp"}


@dataclass
class GGUFModel:
    cfg: ModelConfig
    params: dict
    tokenizer_files: dict[str, bytes]  # tokenizer.json or tokenizer.model
    tokenizer_config: dict[str, Any]  # bos/eos tokens, chat template, add_bos


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER_PATTERN.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def unpermute_rotary_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute`` of q/k projection rows (interleaved -> half-split rotary)."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: Path, **overrides: Any) -> ModelConfig:
    arch_name = meta.get("general.architecture")
    if arch_name not in _ARCHITECTURES:
        raise CheckpointError(path, f"unsupported architecture {arch_name!r} (supported: {', '.join(_ARCHITECTURES)})")
    arch = _ARCHITECTURES[arch_name]

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if value is KeyError:
            raise CheckpointError(path, f"metadata key {arch_name}.{key} is missing")
        return value

    try:
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        layers = int(get("block_count"))
    except (TypeError, ValueError):
        raise CheckpointError(path, "metadata: head_count, embedding_length and block_count must be numbers") from None
    # The header's counts size what is built from it: check them against the tensors the file holds (a
    # corrupt block_count of 2**31 must not become a list of 2**31 layers).
    blocks = {name.split(".")[1] for name in tensor_names if name.startswith("blk.") and name.count(".") >= 2}
    if layers != len(blocks) or any(not b.isdigit() or int(b) >= layers for b in blocks):
        raise CheckpointError(path, f"metadata says {layers} layers, but the file's tensors are of {len(blocks)}")
    if not (0 < heads <= hidden <= 1 << 20):
        raise CheckpointError(path, f"metadata: implausible head_count {heads} / embedding_length {hidden}")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type in ("none", None):
        scaling = RopeScaling()
    elif scaling_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor")))
    else:
        raise CheckpointError(path, f"unsupported rope scaling {scaling_type!r}")
    window = get("attention.sliding_window", None)
    vocab = get("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens", []))
    experts = _experts(arch_name, get, path)
    if experts and arch == "llama":
        arch = "mixtral"  # llama.cpp writes Mixtral as llama with experts
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length", 0 if experts else KeyError)),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length", hidden // heads)),
            max_position_embeddings=int(get("context_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_windows=(int(window),) * layers if window and arch != "gemma" else (),
            hidden_act="gelu_pytorch_tanh" if arch == "gemma" else "silu",
            norm_weight_offset=1.0 if arch == "gemma" else 0.0,
            scale_embeddings=arch == "gemma",
            **(experts | overrides),
        )
    except UnsupportedModelError as exc:
        raise CheckpointError(path, str(exc)) from None


def _experts(arch_name: str, get: Any, path: Path) -> dict[str, Any]:
    """A mixture of experts' config fields from llama.cpp's keys (nothing for a dense model). Whether the
    chosen experts' weights are renormalised: ``expert_weights_norm`` where the file says, else what
    llama.cpp does for the architecture (Qwen3-MoE and Mixtral yes, Qwen2-MoE no)."""
    count = int(get("expert_count", 0) or 0)
    if not count:
        if arch_name in _MOE_ARCHITECTURES:
            raise CheckpointError(path, f"{arch_name}: metadata key {arch_name}.expert_count is missing")
        return {}
    if arch_name not in (*_MOE_ARCHITECTURES, "llama"):
        raise CheckpointError(path, f"{arch_name} with experts is not supported (Qwen2-MoE, Qwen3-MoE, Mixtral are)")
    return dict(num_experts=count, experts_per_token=int(get("expert_used_count")),
                expert_intermediate_size=int(get("expert_feed_forward_length", None) or get("feed_forward_length")),
                norm_topk_prob=bool(get("expert_weights_norm", arch_name != "qwen2moe")),
                shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0) or 0)
                if arch_name == "qwen2moe" else 0)


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise CheckpointError(path, f"not a readable GGUF file, corrupt or truncated ({type(exc).__name__}: {exc})") from None


def load_gguf(path: str | Path, **overrides: Any) -> GGUFModel:
    """Read a GGUF file into config, params and tokenizer files; raise ``CheckpointError`` on any problem.

    A corrupt file may fail anywhere its bytes are interpreted (a metadata string that is not UTF-8, a
    vocabulary the tokenizer library refuses, ...): whatever the reader did not anticipate is reported as
    a ``CheckpointError`` too, naming the exception (tests/test_bad_input.py mutates files to find them)."""
    path = Path(path)
    try:
        return _load_gguf(path, **overrides)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise CheckpointError(path, f"corrupt GGUF file ({first_line(exc)})") from None


def _load_gguf(path: Path, **overrides: Any) -> GGUFModel:
    reader = _open(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, set(tensors), path, **overrides)
    if "rope_freqs.weight" in tensors:  # llama3-style scaling stored as per-frequency divisors
        cfg = cfg.replace(rope_freq_factors=tuple(float(f) for f in _dequantize(tensors["rope_freqs.weight"], path)))
    by_hf_name = {hf_name(name): t for name, t in tensors.items() if hf_name(name)}
    permuted = meta.get("general.architecture") in ("llama", "mistral")

    stacked: dict[str, np.ndarray] = {}  # the last stacked experts tensor read (each is asked for per expert)

    def fetch_expert_tensor(name: str) -> np.ndarray:
        layer, part = _MOE_PATTERN.match(name).groups()
        expert = _EXPERT_PATTERN.match(part)
        if expert:
            gguf_name = f"blk.{layer}.{_EXPERT_STACKS[expert.group(2)]}.weight"
            if gguf_name not in stacked:
                stacked.clear()
                stacked[gguf_name] = _dequantize(tensors[gguf_name], path)
            return stacked[gguf_name][int(expert.group(1))]
        array = _dequantize(tensors[f"blk.{layer}.{_MOE_SINGLES[part]}.weight"], path)
        return array.reshape(1, -1) if part == "shared_expert_gate" else array  # llama.cpp keeps it 1-D

    def fetch(name: str) -> np.ndarray:
        if cfg.num_experts and _MOE_PATTERN.match(name):
            return fetch_expert_tensor(name)
        array = _dequantize(by_hf_name[name], path)
        if permuted and name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rotary_rows(array, cfg.num_heads)
        elif permuted and name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rotary_rows(array, cfg.num_kv_heads)
        if cfg.norm_weight_offset and name.endswith("norm.weight"):
            array = array - cfg.norm_weight_offset  # llama.cpp stores Gemma norms as (1 + weight)
        return array

    params = assemble_params(cfg, fetch, path)
    return GGUFModel(cfg, params, *tokenizer_from_metadata(meta, path))


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        array = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise CheckpointError(path, f"tensor {tensor.name!r} uses unsupported quantisation type {kind.name}") from None
    except Exception as exc:
        raise CheckpointError(path, f"tensor {tensor.name!r} cannot be read ({exc}); the file may be truncated") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if array.size != int(np.prod(shape)):
        raise CheckpointError(path, f"tensor {tensor.name!r} has {array.size} values, expected shape {shape}")
    return np.asarray(array, dtype=np.float32).reshape(shape)


def tokenizer_from_metadata(meta: dict[str, Any], path: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Synthesise tokenizer files and a ``tokenizer_config.json`` dict from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(path, "the GGUF file carries no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        files = {"tokenizer.json": byte_level_bpe_json(meta, path).encode()}
    elif kind == "llama":
        files = {"tokenizer.model": sentencepiece_proto(meta)}
    else:
        raise CheckpointError(path, f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    config = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        config["flaxchat_stop_token_ids"] = [int(eot)]
    return files, config
