"""flaxchat: a JAX/Flax inference stack for Llama-family models with an OpenAI-compatible server.

One import namespace for the repository's top-level folders (``pyproject.toml`` maps them, so nothing
generic lands in site-packages):

- ``flaxchat.model``: the transformer, its KV cache, quantised weights and CPU kernels (pure functions);
- ``flaxchat.checkpoints``: the model store, orbax I/O, Hugging Face and GGUF import, tokenizer files;
- ``flaxchat.sampling``: the sampler, the device steps and the engine (continuous batching);
- ``flaxchat.serve``: the HTTP app, the chat-completions protocol and the command line.

``docs/ARCHITECTURE.md`` is the map.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

# XLA:CPU contracts ``a * b + c * d`` into a fused multiply-add wherever its fusion of the moment allows, so
# the same element-wise math (RoPE, norms, the MLP's activation) rounds one way in a decode step's program
# and another in a prompt chunk's. Without FMA in XLA's own code (the kernels in model/kernels use FMA
# explicitly, in a fixed order, and do the heavy work) the two programs compute a position's keys and
# values bit for bit alike, which lets the KV of generated tokens serve as cached prefix
# (``EngineSteps.decode_extends_prefix`` checks it at warm-up). Read when JAX starts its CPU backend, so
# it is set on import, before any computation; a max_isa the caller set is left alone. Measured: no
# change in step time (the element-wise work is a small part of a step).
if "--xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX").strip()

# In a source checkout the subpackages are this folder's siblings: found from here, so a checkout (or a
# copy of one) runs its own code whether or not it is the one installed in editable mode.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "model" / "transformer.py").is_file():
    __path__.append(str(_checkout))


def __getattr__(name: str):
    """``flaxchat.LLM`` (and its result types) without importing JAX for ``import flaxchat`` alone."""
    if name in ("LLM", "Result", "Choice", "Score", "write_jsonl", "read_results"):
        from flaxchat import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'flaxchat' has no attribute {name!r}")
