"""Model hyper-parameters: one frozen dataclass for every supported Llama-family decoder.

The config is static (hashable) so it can be closed over by jitted functions; weights live in a
separate pytree. It is built from a Hugging Face ``config.json`` dict here and from GGUF metadata in
``checkpoints/gguf_import.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this stack cannot run faithfully."""


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (the HF ``rope_parameters``/``rope_scaling`` block)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about its shape and numerics."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # Per-frequency divisors stored by llama.cpp (``rope_freqs.weight``) for llama3-scaled GGUFs.
    rope_freq_factors: tuple[float, ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projection bias (Qwen2; Llama/Qwen3 with attention_bias)
    o_bias: bool = False  # output projection bias (Llama/Qwen3 with attention_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    # Per-layer sliding-window length (None = full attention) as a tuple so the config stays hashable.
    sliding_windows: tuple[int | None, ...] = ()
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma)
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    # Mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral): every layer's MLP is ``num_experts`` experts of
    # width ``expert_intermediate_size``, ``experts_per_token`` of them chosen per token by a softmax router,
    # their weights renormalised over the chosen ones when ``norm_topk_prob``; Qwen2-MoE adds a shared
    # expert of width ``shared_expert_intermediate_size`` on every token, scaled by a sigmoid gate. 0: a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the float weights
    # "float32": projections in param_dtype (exact parity with transformers); "int8"/"int4": projection
    # weights in 8-/4-bit blocks with float32 activations (model/quant.py). A runtime choice, not stored.
    weights: str = "float32"
    # Prompt chunks with int4 weights on the CPU kernel: "int8" quantises the normed inputs of q/k/v and
    # gate/up per block of 32 and sums their products in integers (twice as fast, as llama.cpp does for Q4
    # weights; prefill ~1.4x), "float32" keeps them float. Opt-in: with the int8 KV cache it missed the
    # quality bar (4 of 6 greedy continuations, bench/RESULTS.md). Decode steps always keep float
    # activations. A runtime choice, not stored.
    prompt_activations: str = "float32"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise UnsupportedModelError(f"unsupported architecture {self.architecture!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling {self.rope_scaling.rope_type!r} "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows needs one entry per layer")
        if self.weights not in ("float32", "int8", "int4"):
            raise ValueError(f"weights must be 'float32', 'int8' or 'int4', not {self.weights!r}")
        if self.prompt_activations not in ("int8", "float32"):
            raise ValueError(f"prompt_activations must be 'int8' or 'float32', not {self.prompt_activations!r}")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"unsupported activation {self.hidden_act!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def inverse_frequencies(self) -> np.ndarray:
        """RoPE inverse frequencies (float32, length head_dim/2), scaled as the checkpoint asks."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv_freq = inv_freq.astype(np.float32)
        rs = self.rope_scaling
        if rs.rope_type == "linear":
            inv_freq = inv_freq / np.float32(rs.factor)
        elif rs.rope_type == "llama3":
            low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
            high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled)
        if self.rope_freq_factors:
            inv_freq = inv_freq / np.asarray(self.rope_freq_factors, dtype=np.float32)
        return inv_freq.astype(np.float32)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for runtime in ("weights", "prompt_activations"):  # how this process runs, not the checkpoint's
            data.pop(runtime)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        data["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}))
        data["sliding_windows"] = tuple(data.get("sliding_windows", ()))
        data["rope_freq_factors"] = tuple(data.get("rope_freq_factors", ()))
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        archs = hf.get("architectures") or []
        arch_name = archs[0] if archs else None
        if arch_name not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch_name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = SUPPORTED_ARCHITECTURES[arch_name]
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        num_layers = hf["num_hidden_layers"]
        # transformers 5 folds rope_theta into rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
            ),
        )
        if hf.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("MLP projection biases (mlp_bias=true) are not supported")
        windows: tuple[int | None, ...] = ()
        sliding = hf.get("sliding_window")
        if arch in ("mistral", "mixtral") and sliding:
            windows = (int(sliding),) * num_layers
        elif arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and hf.get("use_sliding_window") and sliding:
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
                for i in range(num_layers)
            ]
            windows = tuple(int(sliding) if t == "sliding_attention" else None for t in layer_types)
        act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
        if arch == "gemma":
            act = "gelu_pytorch_tanh"  # transformers forces the tanh approximation for Gemma
        kwargs: dict[str, Any] = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma")),
            qkv_bias=(arch == "qwen2" or bool(hf.get("attention_bias", False))
                      or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True)))),
            o_bias=arch not in ("qwen2", "qwen2_moe") and bool(hf.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            sliding_windows=windows,
            hidden_act=act,
            norm_weight_offset=1.0 if arch == "gemma" else 0.0,
            scale_embeddings=arch == "gemma",
        )
        kwargs.update(_experts(arch, hf))
        kwargs.update(overrides)
        return cls(**kwargs)


def _experts(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen2-MoE, Qwen3-MoE or Mixtral config (nothing for a dense model)."""
    if arch not in ("qwen2_moe", "qwen3_moe", "mixtral"):
        return {}
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not experts or not hf.get("num_experts_per_tok"):
        raise UnsupportedModelError(f"{arch}: the config names no experts (num_experts, num_experts_per_tok)")
    if arch in ("qwen2_moe", "qwen3_moe"):
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise UnsupportedModelError(f"{arch} with dense MLP layers (decoder_sparse_step, mlp_only_layers)")
        shared = int(hf.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
        return dict(num_experts=int(experts), experts_per_token=int(hf["num_experts_per_tok"]),
                    expert_intermediate_size=int(hf["moe_intermediate_size"]),
                    # transformers' defaults: False for Qwen2-MoE, the released Qwen3-MoE configs say True
                    norm_topk_prob=bool(hf.get("norm_topk_prob", arch == "qwen3_moe")),
                    shared_expert_intermediate_size=shared)
    return dict(num_experts=int(experts), experts_per_token=int(hf["num_experts_per_tok"]),
                expert_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True)  # Mixtral always
