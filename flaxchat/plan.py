"""``flaxchat plan``: what a model needs on a mesh of a given device, from its config alone.

Bytes of weights and KV cache per device (laid out by ``model/sharding.py``'s rules, so the plan and the
server agree on what is split and what is replicated), the largest ``slots x context`` that fits, and
rooflines: decode tok/s when a step is bound by reading memory (weights, plus each row's cache) or by compute,
and prefill tok/s bound by compute. Rooflines are ceilings, not measurements: a real step also pays for
collectives, the sampler and the host.

Mixture-of-experts configs (``num_experts``): every expert's weights are held, experts split over ``expert``
and each expert's MLP units over ``model``; a decode step reads the experts its rows route to (expected count
for uniform routing) and computes with the chosen ones. That is the hardware's ceiling: flaxchat's experts
are computed densely today (every expert on every token, ``model/transformer.py``), ``experts /
experts_per_token`` times those FLOPs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flaxchat.model.sharding import MESH_AXES, format_mesh

USABLE_MEMORY = 0.9  # of a device's memory (the rest: XLA's workspace, programs, fragmentation; vLLM's default)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # per device, decimal GB
    bandwidth_gbs: float  # memory bandwidth, GB/s
    tflops: float  # dense bfloat16 (or the serving dtype's) peak, TFLOP/s
    source: str


DEVICES = {  # vendors' published figures per chip
    "v5e": Device("TPU v5e", 16.0 * 1.073741824, 819, 197, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Device("TPU v5p", 95.0 * 1.073741824, 2765, 459, "cloud.google.com/tpu/docs/v5p"),
    "h100": Device("H100 SXM", 80.0, 3350, 989, "nvidia.com H100 datasheet (dense bf16)"),
    "h200": Device("H200 SXM", 141.0, 4800, 989, "nvidia.com H200 datasheet (dense bf16)"),
}

ACCELERATORS = {device.name for device in DEVICES.values()}

BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.25, "int4": 0.75}  # int8/int4: blocks of 32 + scales
BYTES_PER_KV = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.25}  # int8: a float32 scale per 32 elements


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a decoder's config (Hugging Face ``config.json`` names)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied: bool = False
    experts: int = 0  # mixture-of-experts: experts per layer, chosen per token, each expert's MLP width
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE: a shared expert's MLP width (every token, under a sigmoid gate)
    architecture: str = ""
    qk_norm: bool = False  # Qwen3: a norm scale per head dimension on q and k

    @classmethod
    def from_hf(cls, name: str, hf: dict[str, Any]) -> "Shape":
        heads = hf["num_attention_heads"]
        return cls(name=name, hidden=hf["hidden_size"], intermediate=hf.get("intermediate_size", 0),
                   layers=hf["num_hidden_layers"], heads=heads, kv_heads=hf.get("num_key_value_heads", heads),
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab=hf["vocab_size"],
                   context=hf.get("max_position_embeddings", 4096), tied=bool(hf.get("tie_word_embeddings", False)),
                   experts=hf.get("num_experts") or hf.get("num_local_experts") or 0,
                   experts_per_token=hf.get("num_experts_per_tok", 0),
                   expert_intermediate=hf.get("moe_intermediate_size") or hf.get("intermediate_size", 0),
                   shared_intermediate=hf.get("shared_expert_intermediate_size") or 0,
                   architecture=(hf.get("architectures") or [""])[0],
                   qk_norm=(hf.get("architectures") or [""])[0].startswith("Qwen3"))

    @classmethod
    def from_model_config(cls, name: str, cfg: Any) -> "Shape":
        return cls(name=name, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_layers,
                   heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size,
                   context=cfg.max_position_embeddings, tied=cfg.tie_word_embeddings, architecture=cfg.architecture,
                   qk_norm=cfg.qk_norm, experts=cfg.num_experts, experts_per_token=cfg.experts_per_token,
                   expert_intermediate=cfg.expert_intermediate_size,
                   shared_intermediate=cfg.shared_expert_intermediate_size)


# Published config.json values of the models docs/SCALING.md plans (no hub access at run time).
KNOWN = {
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192),
    "qwen3-32b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=5120, intermediate_size=25600,
                      num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      vocab_size=151936, max_position_embeddings=40960),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768),
}


def resolve_shape(model: str) -> Shape:
    """A known model's name, a ``config.json`` (or a folder holding one), or a model in the store."""
    if model.lower() in KNOWN:
        return Shape.from_hf(model.lower(), KNOWN[model.lower()])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if "num_layers" in data and "architecture" in data:  # a stored model's own (flaxchat) config
            from flaxchat.model.config import ModelConfig

            return Shape.from_model_config(path.parent.name, ModelConfig.from_dict(data))
        return Shape.from_hf(path.parent.name, data)
    from flaxchat.checkpoints.store import canonical_name, is_stored, model_dir

    name = canonical_name(model)
    if is_stored(name):
        return resolve_shape(str(model_dir(name) / "config.json"))
    raise ValueError(f"unknown model {model!r}: a known name ({', '.join(KNOWN)}), a config.json or a stored model")


def _split(units: tuple[int, ...], ways: int) -> int:
    """How many ways an axis splits: ``ways`` when it divides every unit count (model/sharding.py), else 1."""
    return ways if ways > 1 and all(n % ways == 0 for n in units) else 1


@dataclass(frozen=True)
class Plan:
    shape: Shape
    device: Device
    mesh: dict[str, int]
    weights: str
    kv_dtype: str
    weight_bytes: float  # per device
    kv_bytes_per_token: float  # per device, one token of one sequence
    params: float  # total parameters
    active_params: float  # per token (all of them for a dense model)
    attention_split: int
    tokens_per_shard: int  # cache positions one data shard holds
    rows: dict[int, dict[str, float]] = field(default_factory=dict)  # decode rooflines by rows per data shard

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())


def _weights(shape: Shape, model_ways: int, expert_ways: int = 1) -> tuple[float, float, float, int]:
    """(total params, params per device, active params per token, attention split): each weight matrix laid out
    as model/sharding.py lays it out (heads split only with their KV heads, MLP units, vocabulary)."""
    attn_split = _split((shape.heads, shape.kv_heads), model_ways)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = shape.hidden * (2 * q + 2 * kv)  # q, k, v, o
    norms = 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)
    if shape.experts:
        width, count = shape.expert_intermediate, shape.experts
        mlp = 3 * shape.hidden * width * count + shape.hidden * count  # experts + router (replicated)
        mlp_per_device = (3 * shape.hidden * width * count / _split((width,), model_ways) / _split((count,), expert_ways)
                          + shape.hidden * count)
        active_mlp = 3 * shape.hidden * width * shape.experts_per_token + shape.hidden * count
        if shape.shared_intermediate:  # a dense MLP (split like one) and its gate (replicated)
            shared = 3 * shape.hidden * shape.shared_intermediate
            mlp, active_mlp = mlp + shared + shape.hidden, active_mlp + shared + shape.hidden
            mlp_per_device += shared / _split((shape.shared_intermediate,), model_ways) + shape.hidden
    else:
        mlp = active_mlp = 3 * shape.hidden * shape.intermediate
        mlp_per_device = mlp / _split((shape.intermediate,), model_ways)
    vocab_split = _split((shape.vocab,), model_ways)
    vocab = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    total = shape.layers * (attention + mlp + norms) + vocab + shape.hidden
    per_device = shape.layers * (attention / attn_split + mlp_per_device + norms) + vocab / vocab_split + shape.hidden
    active = shape.layers * (attention + active_mlp) + shape.vocab * shape.hidden  # the LM head, not the lookup
    return total, per_device, active, attn_split


def make_plan(shape: Shape, device: Device, mesh: dict[str, int], weights: str = "bfloat16",
              kv_dtype: str = "bfloat16", context: int | None = None,
              row_counts: tuple[int, ...] = (1, 8, 32, 128, 256)) -> Plan:
    """The plan of ``shape`` on ``mesh`` of ``device``; decode rooflines at ``context`` positions per row
    (default: half the model's context, capped at 8192: an average row mid-way through a long reply)."""
    model_ways = mesh.get("model", 1)
    total, per_device, active, attn_split = _weights(shape, model_ways, mesh.get("expert", 1))
    if weights in ("int8", "int4"):  # quantised projections are replicated (model/sharding.py), the cache is not
        per_device = total
    weight_bytes = per_device * BYTES_PER_WEIGHT[weights]
    kv_per_token = 2 * shape.layers * (shape.kv_heads // attn_split) * shape.head_dim * BYTES_PER_KV[kv_dtype]
    free = device.memory_gb * 1e9 * USABLE_MEMORY - weight_bytes
    tokens = max(0, int(free // kv_per_token))
    plan = Plan(shape, device, {a: mesh.get(a, 1) for a in MESH_AXES}, weights, kv_dtype, weight_bytes, kv_per_token,
                total, active, attn_split, tokens)
    position = context or min(shape.context // 2, 8192)
    for rows in row_counts:
        if rows * position > tokens:
            break
        plan.rows[rows] = decode_roofline(plan, rows, position)
    return plan


def decode_roofline(plan: Plan, rows: int, position: int) -> dict[str, float]:
    """One decode step of ``rows`` rows per data shard, each at ``position``: bytes read and FLOPs per device,
    the step's time bound by each, and tokens per second over the whole mesh at the slower of the two."""
    shape, device, model_ways = plan.shape, plan.device, plan.mesh["model"]
    weight_bytes = plan.weight_bytes
    if shape.experts:  # only the experts some row routes to are read (uniform routing, expected count)
        touched = shape.experts * (1 - (1 - shape.experts_per_token / shape.experts) ** rows)
        expert_bytes = (3 * shape.hidden * shape.expert_intermediate * shape.layers * BYTES_PER_WEIGHT[plan.weights]
                        / _split((shape.expert_intermediate,), model_ways))
        weight_bytes -= expert_bytes * (shape.experts - touched) / _split((shape.experts,), plan.mesh["expert"])
    cache_bytes = rows * position * plan.kv_bytes_per_token
    attention_flops = 4 * rows * position * shape.heads * shape.head_dim * shape.layers / plan.attention_split
    flops = 2 * plan.active_params * rows / (model_ways * plan.mesh["expert"]) + attention_flops
    memory_s = (weight_bytes + cache_bytes) / (device.bandwidth_gbs * 1e9)
    compute_s = flops / (device.tflops * 1e12)
    step = max(memory_s, compute_s)
    return {"memory_ms": memory_s * 1e3, "compute_ms": compute_s * 1e3,
            "tokens_per_s": plan.mesh["data"] * rows / step, "bound": "memory" if memory_s >= compute_s else "compute"}


def prefill_roofline(plan: Plan, prompt: int = 2048) -> float:
    """Prompt tokens per second over the mesh when prefill is compute-bound (each data shard prefilling its
    own prompts of ``prompt`` tokens)."""
    shape = plan.shape
    per_token = 2 * plan.active_params + 2 * prompt * shape.heads * shape.head_dim * shape.layers  # causal: p/2 avg
    return plan.devices * plan.device.tflops * 1e12 / per_token


def serve_command(plan: Plan) -> str | None:
    """What a user types to serve the plan (None: nothing fits, or quantised experts, which flaxchat lacks)."""
    if plan.shape.experts and plan.weights in ("int8", "int4"):
        return None
    data = plan.mesh["data"]
    context = min(plan.shape.context, 8192)
    slots = plan.tokens_per_shard // context * data
    if slots < data:
        return None
    flags = [] if plan.devices == 1 else [f"--mesh {format_mesh(plan.mesh)}"]
    if plan.weights == "bfloat16" or (plan.weights in ("int8", "int4") and plan.device.name in ACCELERATORS):
        flags.append("--dtype bfloat16")  # on an accelerator, the compute type
    if plan.weights != "bfloat16":
        flags.append(f"--weights {plan.weights}")
    flags += [f"--kv-dtype {plan.kv_dtype}", f"--slots {slots}", f"--max-len {context}"]
    return f"flaxchat serve ./{plan.shape.name} " + " ".join(flags)


def render(plan: Plan) -> str:
    """The plan as Markdown: memory, capacity, rooflines, the command."""
    s, gb = plan.shape, 1e9
    lines = [f"### {s.name} on {plan.devices} x {plan.device.name} (mesh {format_mesh(plan.mesh)}, "
             f"{plan.weights} weights, {plan.kv_dtype} KV cache)", ""]
    moe = f", {s.experts} experts, {s.experts_per_token} per token" if s.experts else ""
    lines.append(f"- {plan.params / 1e9:.2f} B parameters ({plan.active_params / 1e9:.2f} B active per token{moe}); "
                 f"attention heads split {plan.attention_split} ways ({s.heads} heads, {s.kv_heads} KV heads)")
    usable = plan.device.memory_gb * USABLE_MEMORY
    lines.append(f"- per device: weights {plan.weight_bytes / gb:.2f} GB of {usable:.1f} GB usable; KV cache "
                 f"{plan.kv_bytes_per_token / 1e3:.1f} KB per token")
    if plan.tokens_per_shard <= 0:
        lines.append("- **does not fit**: the weights alone exceed the usable memory")
        return "\n".join(lines) + "\n"
    fits = ", ".join(f"{plan.tokens_per_shard // c * plan.mesh['data']} x {c}"
                     for c in (2048, 8192, 32768) if c <= s.context and plan.tokens_per_shard >= c)
    lines.append(f"- cache positions per data shard: {plan.tokens_per_shard:,}; largest slots x context: {fits}")
    lines.append(f"- prefill roofline (compute): {prefill_roofline(plan):,.0f} prompt tok/s")
    lines += ["", "| rows per data shard | memory-bound step | compute-bound step | decode tok/s (mesh) | bound |",
              "| ---: | ---: | ---: | ---: | --- |"]
    for rows, r in plan.rows.items():
        lines.append(f"| {rows} | {r['memory_ms']:.3f} ms | {r['compute_ms']:.3f} ms | {r['tokens_per_s']:,.0f} | "
                     f"{r['bound']} |")
    command = serve_command(plan)
    lines += ["", f"Serve: `{command}`" if command else "Serve: does not fit as flaxchat would run it"]
    return "\n".join(lines) + "\n"


def this_cpu() -> Device:
    """This machine, measured (~1 s): its memory, a large copy's bandwidth, a float32 matrix product's rate."""
    import os
    import time

    import numpy as np

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    source, target = np.ones(2**26, np.float32), np.empty(2**26, np.float32)  # 256 MB each
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    bandwidth = 2 * source.nbytes / best / 1e9  # read + write
    a = np.ones((1024, 1024), np.float32)
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return Device(f"CPU ({os.cpu_count()} threads)", memory, bandwidth, 2 * 1024**3 / best / 1e12,
                  "measured on this machine: memory copy and a float32 matrix product")


def parse_device(name: str) -> Device:
    if name.lower() == "cpu":
        return this_cpu()
    if name.lower() not in DEVICES:
        raise ValueError(f"unknown device {name!r}: one of {', '.join(DEVICES)}, cpu")
    return DEVICES[name.lower()]


# docs/SCALING.md: these models on a TPU v5e-8 and on 8 x H100, each on two meshes, in bfloat16; and int8
# weights where bfloat16 does not fit.
SCALING_MODELS = ("llama-3-8b", "llama-3-70b", "qwen3-32b", "qwen3-30b-a3b")
SCALING_MESHES = ({"data": 1, "model": 8}, {"data": 2, "model": 4})
SCALING_CONTEXT = 8192


def summary(plans: list[Plan]) -> str:
    """One Markdown table row per plan: memory, capacity at SCALING_CONTEXT, rooflines, the command."""
    lines = ["| model | mesh | weights | weights / device | KV / token / device | slots x 8192 | decode tok/s, 1 row "
             "per shard | 32 rows per shard | prefill tok/s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def rate(rows: int) -> str:
        return f"{plan.rows[rows]['tokens_per_s']:,.0f}" if rows in plan.rows else "-"

    for plan in plans:
        fits = plan.tokens_per_shard > 0
        slots = plan.tokens_per_shard // SCALING_CONTEXT * plan.mesh["data"] if fits else "does not fit"
        slots = slots or "< 1"
        prefill = f"{prefill_roofline(plan):,.0f}" if fits else "-"
        lines.append(f"| {plan.shape.name} | {format_mesh(plan.mesh)} | {plan.weights} | {plan.weight_bytes / 1e9:.2f} GB | "
                     f"{plan.kv_bytes_per_token / 1e3:.1f} KB | {slots} | {rate(1)} | {rate(32)} | {prefill} |")
    return "\n".join(lines) + "\n"


def scaling_plans(device: str) -> list[Plan]:
    plans = []
    for model in SCALING_MODELS:
        experts = ({"data": 1, "model": 1, "expert": 8},) if resolve_shape(model).experts else ()
        for mesh in SCALING_MESHES + experts:
            plan = make_plan(resolve_shape(model), DEVICES[device], mesh, context=SCALING_CONTEXT // 2)
            if plan.tokens_per_shard <= 0:
                plans.append(plan)
                plan = make_plan(resolve_shape(model), DEVICES[device], mesh, weights="int8",
                                 context=SCALING_CONTEXT // 2)
            plans.append(plan)
    return plans


def scaling_document() -> str:
    """docs/SCALING.md's body (tests/test_plan.py checks the file is this output)."""
    parts = [SCALING_HEADER]
    for device, title in (("v5e", "TPU v5e-8 (8 chips)"), ("h100", "8 x H100 SXM")):
        plans = scaling_plans(device)
        parts += [f"## {title}", "", summary(plans), "Commands:", ""]
        parts += [f"- {p.shape.name}, {format_mesh(p.mesh)}, {p.weights}: " + (f"`{serve_command(p)}`" if serve_command(p)
                  else "does not fit") for p in plans]
        parts.append("")
    return "\n".join(parts)


SCALING_HEADER = """# Scaling: what fits where, and how fast it could go

Generated by `flaxchat plan` (`flaxchat/plan.py`; `tests/test_plan.py` checks this file is its output). For
one model: `flaxchat plan MODEL --mesh data=D,model=M --device v5e|v5p|h100|h200|cpu`.

How to read it:

- **Layout** is `model/sharding.py`'s: attention heads split over `model` only where it divides the query and
  the KV heads (else replicated), MLP units and vocabulary split over `model`, slots over `data` (each data
  shard holds `slots / D` sequences and a copy of the weights). Memory is per device, 90 % of it usable.
- **slots x 8192**: sequences of 8,192 positions whose KV cache fits beside the weights (bfloat16 cache).
- **Decode tok/s** is a roofline at 4,096 positions per row: a step reads each device's weights (for a
  mixture of experts, the experts its rows route to) and each row's cache, or does its FLOPs, whichever takes
  longer; tokens over the whole mesh. **Prefill tok/s**: every device's FLOPs spent on 2,048-token prompts.
  Ceilings, not measurements: a real step also pays for collectives, the sampler and the host, and flaxchat's
  prefill currently runs each prompt on every data shard.
- Device figures are the vendors' published per-chip numbers (HBM size, bandwidth, dense bfloat16 FLOP/s).
- int8 rows: where bfloat16 weights do not fit, 8-bit blocks (1.25 bytes per weight). flaxchat replicates
  quantised weights on every device today (`model/sharding.py`: the CPU kernel is one opaque call), so on a
  mesh they only help where the whole model fits one device; splitting them is issue 11's remaining work.
- Mixture of experts (Qwen3-30B-A3B): the rooflines route each token to its chosen experts only; flaxchat
  computes every expert on every token today (`model/transformer.py`, 16x the FLOPs for 8 of 128), so its
  compute-bound steps are that much slower than the table until a grouped expert product lands.
"""
