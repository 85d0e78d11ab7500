"""Native CPU kernels, compiled from source on first use and registered with XLA as FFI targets.

``qmatmul`` (``qmatmul.cc``, the layout in ``qmatmul.h``): float32 activations times 8-bit or 4-bit
block-quantised weights (``model/quant.py``); ``qmatmul_q8.cc``: int8 activations for prompt chunks.
``prefill_attention`` (``prefill_attention.cc``): each row's query positions over its KV cache, a prompt
chunk's or a decode step's one (``model/attention.py``). All compute each row on its own, so a row's bits
never depend on the other rows of a call or on how a sequence was cut into chunks and steps (the seed
contract across decode buckets and the prefix cache, decoded tokens' blocks included). The shared library is built with
the machine's C++ compiler (``$CXX``, else ``c++``/``g++``) against the XLA FFI headers that ship with
jaxlib, into ``$FLAXCHAT_KERNEL_CACHE`` (default ``~/.cache/flaxchat/kernels``, shared by every
``FLAXCHAT_HOME``) under a name that includes a hash of the sources, the flags and the jax version, so a
changed kernel or jax is rebuilt and an unchanged one is built once (a few seconds).

Where the kernel cannot be built (no compiler, no AVX2/FMA, not x86-64) ``available()`` is False and
callers use the XLA formulation instead; ``build_error()`` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

QMATMUL_TARGET = "flaxchat_qmatmul"
QMATMUL4_TARGET = "flaxchat_qmatmul4"
QMATMUL4_Q8_TARGET = "flaxchat_qmatmul4_q8"
PREFILL_ATTENTION_TARGET = "flaxchat_prefill_attention"

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("qmatmul.cc", "qmatmul_q8.cc", "prefill_attention.cc"))
_HEADERS = tuple(Path(__file__).with_name(name) for name in ("parallel.h", "qmatmul.h", "cache_entries.h",
                                                                 "vector_math.h"))
_TARGETS = {QMATMUL_TARGET: "FlaxchatQMatmul", QMATMUL4_TARGET: "FlaxchatQMatmul4", QMATMUL4_Q8_TARGET: "FlaxchatQMatmul4Q8",
            PREFILL_ATTENTION_TARGET: "FlaxchatPrefillAttention"}
# -ffp-contract=off: the compiler may not fuse a*b+c on its own, so the arithmetic is exactly what the
# source spells out, on every code path.
_FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared", "-std=c++17", "-w")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_supports_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _library_path() -> Path:
    folder = Path(os.environ.get("FLAXCHAT_KERNEL_CACHE") or Path.home() / ".cache" / "flaxchat" / "kernels")
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in _SOURCES + _HEADERS) + " ".join(_FLAGS).encode()
                            + jax.__version__.encode())
    return folder.expanduser() / f"flaxchat-kernels-{digest.hexdigest()[:16]}.so"


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent loader sees the whole library or none


def _load() -> None:
    if os.environ.get("FLAXCHAT_NO_KERNELS"):
        raise RuntimeError("disabled by FLAXCHAT_NO_KERNELS")
    if not _cpu_supports_avx2_fma():
        raise RuntimeError("needs an x86-64 CPU with AVX2 and FMA")
    compiler = _compiler()
    path = _library_path()
    if not path.is_file():
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX)")
        _build(path, compiler)
    library = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    _state["library"] = library


def available() -> bool:
    """Build (once) and register the kernels; False, with ``build_error()`` set, where that fails, and False
    whenever programs run on another backend than the CPU (the kernels are registered for the CPU only: a
    GPU or TPU runs the XLA formulation)."""
    if jax.default_backend() != "cpu":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                _load()
                _state["ok"] = True
            except (OSError, RuntimeError) as exc:
                _state["ok"], _state["error"] = False, str(exc)
        return bool(_state["ok"])


def build_error() -> str | None:
    return _state.get("error")  # type: ignore[return-value]
