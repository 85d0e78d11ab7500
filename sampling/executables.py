"""Compiled device steps kept on disk, so a restarted server neither traces nor compiles them again.

JAX's persistent compilation cache saves XLA's compile (~4 s per decode program of the default model on
this machine) but not the tracing and lowering in Python before it (~2.3 s per program: most of a warm
restart's warm-up). ``jax.experimental.serialize_executable`` saves the loaded executable itself; reading
one back takes ~0.3 s.

An entry is found only under a key of everything its program depends on: the source of the code it is
traced from (``model/``, ``sampling/``, the kernels), jax's version, the machine's platform and CPU flags
(XLA:CPU compiles for the host), XLA flags, the step's static configuration and every argument's shape and
dtype. An entry that cannot be read is compiled again and replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import platform
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable

log = logging.getLogger("flaxchat.executables")

_ROOT = Path(__file__).resolve().parents[1]
_TRACED_SOURCES = ("model", "sampling")


def _code_digest() -> str:
    digest = hashlib.sha256()
    for package in _TRACED_SOURCES:
        for path in sorted((_ROOT / package).rglob("*")):
            if path.suffix in (".py", ".cc", ".h") and path.is_file():
                digest.update(str(path.relative_to(_ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()


def _machine() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    device = jax.devices()[0]
    return "|".join([platform.machine(), device.platform, device.device_kind, flags,
                     os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64)])


def _avals(args: tuple) -> str:
    leaves, tree = jax.tree.flatten(args)
    return str(tree) + repr([(np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves])


class ExecutableStore:
    """A folder of serialised executables for one static configuration (``context``: its repr)."""

    def __init__(self, folder: str | Path, context: str):
        self.folder = Path(folder)
        self.context = "|".join([context, _code_digest(), jax.__version__, _machine()])
        self.loaded = self.compiled = 0

    def load_or_compile(self, name: str, jitted: Callable, args: tuple) -> Any:
        key = hashlib.sha256(f"{self.context}|{name}|{_avals(args)}".encode()).hexdigest()[:32]
        path = self.folder / f"{name}-{key}.executable"
        try:
            blob, in_tree, out_tree = pickle.loads(path.read_bytes())
            executable = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
            self.loaded += 1
            return executable
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is compiled again
            log.warning("recompiling %s: stored executable unreadable (%s)", path.name, exc)
        # Compiled afresh, past JAX's persistent cache: an executable that cache handed back serialised into
        # an entry that failed to load in a new process ("Function ... not found"; jax 0.10.2, XLA:CPU).
        cache_on = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            executable = jitted.lower(*args).compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", cache_on)
        self.compiled += 1
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, delete=False) as tmp:
                tmp.write(pickle.dumps(serialize_executable.serialize(executable)))
            os.replace(tmp.name, path)  # atomic: a concurrent reader sees the whole entry or none
        except OSError as exc:
            log.warning("could not store %s (%s)", path.name, exc)
        return executable


class Program:
    """A jitted step plus the executables warm-up loaded for it, picked by the shapes of its small arguments.

    The first ``fixed`` arguments (params, device state) have the same shapes on every call, so the shapes
    of the rest name the variant; without a loaded variant the call goes to the jitted function.
    """

    def __init__(self, name: str, jitted: Callable, fixed: int):
        self.name, self.jitted, self.fixed = name, jitted, fixed
        self.variants: dict[Hashable, Any] = {}

    def _variant(self, args: tuple) -> Hashable:
        return tuple(np.shape(a) for a in jax.tree.leaves(args[self.fixed:]))

    def __call__(self, *args: Any) -> Any:
        executable = self.variants.get(self._variant(args)) if self.variants else None
        return (executable or self.jitted)(*args)

    def prepare(self, store: ExecutableStore | None, *args: Any) -> None:
        """Load (or compile and store) the variant for ``args``; without a store, nothing (the first call
        compiles it)."""
        if store is not None:
            self.variants[self._variant(args)] = store.load_or_compile(self.name, self.jitted, args)
