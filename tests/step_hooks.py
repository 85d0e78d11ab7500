"""A hook on a running engine's device steps (tests only): called on the engine thread before each prefill
call (``"prefill"``) and each decode call (``"decode"``), to hold, slow down or fail a step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class HookedSteps:
    """``steps`` with ``hook(stage)`` called before its prefill and decode calls; everything else passes."""

    def __init__(self, steps: Any, hook: Callable[[str], Any]):
        self.wrapped, self._hook = steps, hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def prefill_chunk(self, *args: Any, **kwargs: Any) -> Any:
        self._hook("prefill")
        return self.wrapped.prefill_chunk(*args, **kwargs)

    def prefill_batch(self, *args: Any, **kwargs: Any) -> Any:
        self._hook("prefill")
        return self.wrapped.prefill_batch(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self._hook("decode")
        return self.wrapped.decode(*args, **kwargs)


def set_step_hook(engine: Any, hook: Callable[[str], Any] | None) -> None:
    """Install ``hook`` on ``engine``'s steps (None removes it)."""
    steps = getattr(engine.steps, "wrapped", engine.steps)
    engine.steps = engine.prefill_queue.steps = steps if hook is None else HookedSteps(steps, hook)
