"""flaxchat: a JAX/Flax inference stack for Llama-family models with an OpenAI-compatible server.

One import namespace for the repository's top-level folders (``pyproject.toml`` maps them, so nothing
generic lands in site-packages):

- ``flaxchat.model``: the transformer, its KV cache, quantised weights and CPU kernels (pure functions);
- ``flaxchat.checkpoints``: the model store, orbax I/O, Hugging Face and GGUF import, tokenizer files;
- ``flaxchat.sampling``: the sampler, the device steps and the engine (continuous batching);
- ``flaxchat.serve``: the HTTP app, the chat-completions protocol and the command line.

``docs/ARCHITECTURE.md`` is the map.
"""

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout the subpackages are this folder's siblings: found from here, so a checkout (or a
# copy of one) runs its own code whether or not it is the one installed in editable mode.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "model" / "transformer.py").is_file():
    __path__.append(str(_checkout))
