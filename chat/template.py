"""Render Hugging Face chat templates exactly as ``transformers.apply_chat_template`` does.

Chat templates are untrusted code from model repositories, so they run in Jinja2's immutable sandbox
with the same globals and filters transformers provides (``raise_exception``, ``tojson``,
``strftime_now``, ``namespace``), and every value the template sees is rebuilt from plain JSON types.
A render also has a budget (``RENDER_SECONDS``, ``RENDER_CHARS``): a template that loops or builds huge
strings fails the one request in bounded time instead of holding the server's event loop.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template raised (``raise_exception``) or could not be compiled/rendered."""


RENDER_SECONDS = 2.0  # one render's time (a real template takes well under a millisecond per message)
RENDER_CHARS = 16 * 1024 * 1024  # the most text one render may produce, or build in one value
_CHECK_EVERY = 1024  # range items between deadline checks
_budget = threading.local()  # this thread's render deadline (the compiled environment is shared)


def _check_deadline() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise jinja2.exceptions.SecurityError(f"the chat template ran longer than {RENDER_SECONDS:g} s")


def _check_size(size: int) -> None:
    if size > RENDER_CHARS:
        raise jinja2.exceptions.SecurityError(f"the chat template built more than {RENDER_CHARS} characters")


def _budgeted_range(*args: int):
    """The sandbox's ``range`` (at most ``MAX_RANGE`` items), checking the deadline as it goes."""
    for i, value in enumerate(jinja2.sandbox.safe_range(*args)):
        if i % _CHECK_EVERY == 0:
            _check_deadline()
        yield value


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every call and every repetition or power checked against the budget."""

    intercepted_binops = frozenset(["*", "**"])

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    _check_size(len(sequence) * count)
        elif isinstance(left, int) and isinstance(right, int) and abs(right) > 256 and abs(left) > 1:
            raise jinja2.exceptions.SecurityError("the chat template raised an integer to a huge power")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; HF's does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - same trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        if isinstance(value, (str, list)):
            _check_size(len(value))  # what a loop could double each time
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set attribute {name!r} on a namespace")


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["range"] = _budgeted_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def plain(value: Any) -> Any:
    """Rebuild a value from plain JSON types so the sandbox only ever sees dict/list/str/number/bool/None."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):  # pydantic models
        return plain(value.model_dump(exclude_none=True))
    raise TypeError(f"cannot pass a {type(value).__name__} to a chat template")


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` to the prompt text; extra ``kwargs`` reach the template (e.g. ``enable_thinking``).

    ``special_tokens`` are the ``bos_token``/``eos_token``/... strings, exposed to the template as HF does
    (explicit kwargs win over them).
    """
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(plain(kwargs))
    compiled = compile_template(template)
    _budget.deadline = time.monotonic() + RENDER_SECONDS
    try:
        pieces, size = [], 0
        for piece in compiled.generate(messages=plain(messages), tools=plain(tools), documents=plain(documents),
                                       add_generation_prompt=add_generation_prompt, **variables):
            size += len(piece)
            _check_size(size)
            _check_deadline()
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise ChatTemplateError(f"chat template error: {type(exc).__name__}") from None
    finally:
        _budget.deadline = None
