"""Several processes driving one mesh: the engine's device calls, replayed in lockstep.

JAX's multi-controller runtime runs a program over a mesh that spans processes only when every process
dispatches the same programs, with the same host arguments, in the same order. One process (the leader:
HTTP, the scheduler, the prefix index, the grammars) decides every call; ``Leader`` wraps its
``DeviceSteps`` and, before running each call that touches the device, sends the call's name and host
arguments to the other processes (``follow``), which run the same call on their own ``EngineSteps``. The
engine above the steps is unchanged: admissions, releases, masks and cancellations all reach the device
only through these calls.

What crosses: ints, token lists, numpy arrays (a choice's settings row, guided masks; compressed), PRNG keys
as their raw words, and, for logits a prefill returned (which stay on the devices), a reference to the call
that made them. The state is not sent: each process threads its own (the engine always passes the last
state back). Messages are JSON, never pickles, so a peer can send nothing but these calls. Results the host
reads (sampled tokens, prompt scores) are replicated over the mesh by ``Placement``, so the leader reads
them from its own devices.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import logging
import weakref
import zlib
from typing import Any, Callable, Protocol

import jax
import numpy as np

from flaxchat.sampling.device_steps import DeviceLost, DeviceSteps
from flaxchat.sampling.sampler import RowRequest

log = logging.getLogger("flaxchat")


class Channel(Protocol):
    """Ordered messages from the leader to every follower."""

    def send(self, message: bytes) -> None: ...

    def receive(self) -> bytes: ...


class LockstepError(RuntimeError):
    """The processes cannot run in lockstep (they were started with different settings)."""


# The calls that touch the device, and where prefill logits are in their results (kept by reference).
_DEVICE_CALLS = {"warmup": None, "init_state": None, "prefill_chunk": 0, "score_chunk": 1, "prefill_batch": 0,
                 "prefill": 0, "load_blocks": None, "save_blocks": None, "copy_slot": None, "insert": None,
                 "decode": None, "release": None, "set_allowed": None}
_STATELESS = {"warmup", "init_state"}  # the calls that make a state rather than take one
_COMPRESS_ABOVE = 1024  # array bytes; a settings row is mostly zeros


@dataclasses.dataclass(frozen=True)
class LogitsRef:
    """Prefill logits as the leader's engine holds them: the array (or the ``index``-th of a batch's) and
    the call that made them, which the followers resolve in their own store."""

    call: int
    index: int | None
    _array: Any = dataclasses.field(repr=False, compare=False)

    def resolve(self) -> Any:
        return self._array if self.index is None else self._array[self.index]


# ---- the message codec ---------------------------------------------------------------------------
def encode(value: Any) -> Any:
    """``value`` as JSON-ready data: every non-scalar is a one-key dict naming its kind."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):  # keeps its dtype: a Python int would reach a jit weakly typed
        return {"scalar": encode(np.asarray(value))}
    if isinstance(value, LogitsRef):
        return {"ref": [value.call, value.index]}
    if isinstance(value, RowRequest):
        return {"row": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return {"key": encode(np.asarray(jax.random.key_data(value))), "impl": str(jax.random.key_impl(value))}
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value)
        data = array.tobytes()  # C order whatever the layout
        packed = zlib.compress(data, 1) if len(data) > _COMPRESS_ABOVE else None
        return {"array": base64.b64encode(packed or data).decode(), "dtype": array.dtype.str,
                "shape": list(array.shape), "zlib": packed is not None}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"cannot send a {type(value).__name__} to the other processes")


def decode(data: Any, refs: Callable[[int, int | None], Any]) -> Any:
    """The inverse of ``encode``; ``refs(call, index)`` gives the follower's own logits for a reference."""
    if isinstance(data, list):
        return [decode(v, refs) for v in data]
    if not isinstance(data, dict):
        return data
    (kind, body), = ((k, v) for k, v in data.items() if k in ("ref", "row", "key", "array", "scalar", "tuple", "dict"))
    if kind == "ref":
        return refs(*body)
    if kind == "row":
        return RowRequest(**{name: decode(v, refs) for name, v in body.items()})
    if kind == "key":
        return jax.random.wrap_key_data(decode(body, refs), impl=data["impl"])
    if kind == "array":
        raw = base64.b64decode(body)
        return np.frombuffer(zlib.decompress(raw) if data["zlib"] else raw, np.dtype(data["dtype"])
                             ).reshape(tuple(data["shape"])).copy()
    if kind == "scalar":
        return decode(body, refs)[()]
    if kind == "tuple":
        return tuple(decode(v, refs) for v in body)
    return {decode(k, refs): decode(v, refs) for k, v in body}


def settings_digest(*settings: Any) -> str:
    """What must be equal on every process for their steps to match (configs' reprs)."""
    return repr(settings)


# ---- the leader ----------------------------------------------------------------------------------
class Leader:
    """``DeviceSteps`` that send each device call to the followers before running it here."""

    def __init__(self, steps: DeviceSteps, channel: Channel, settings: str):
        """``settings``: ``settings_digest`` of what built ``steps``; a follower built otherwise refuses."""
        self._steps, self._channel = steps, channel
        self._calls = 0
        # logits references the engine dropped (collected on any thread), sent with the next call
        self._forgotten: collections.deque = collections.deque()
        self._closed = False
        self.lost: str | None = None
        self._send("hello", [settings], {})

    def __getattr__(self, name: str) -> Any:  # attributes, properties and host-only methods (chunk_length, ...)
        if name in _DEVICE_CALLS:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        return getattr(self._steps, name)

    def _send(self, method: str, args: list, kwargs: dict) -> int:
        self._calls += 1
        forget = []
        while self._forgotten:
            forget.append(self._forgotten.popleft())
        self._channel.send(json.dumps({"call": self._calls, "method": method, "args": encode(args),
                                       "kwargs": encode(kwargs), "forget": forget}).encode())
        return self._calls

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        if self._closed:
            raise LockstepError("the lockstep channel is closed")
        if self.lost:
            raise DeviceLost(self.lost)
        call = self._send(method, list(args if method in _STATELESS else args[1:]), kwargs)  # not the state
        local = [a.resolve() if isinstance(a, LogitsRef) else a for a in args]
        try:
            result = getattr(self._steps, method)(*local, **kwargs)
        except jax.errors.JaxRuntimeError as exc:
            self.failed(exc)
            raise DeviceLost(self.lost) from exc
        at = _DEVICE_CALLS[method]
        if at is None:
            return result
        logits = result[at]
        if method == "prefill_batch":
            refs = tuple(self._ref(call, i, logits) for i in range(len(logits)))
        else:
            refs = self._ref(call, None, logits)
        return (*result[:at], refs, *result[at + 1:])

    def failed(self, error: Exception) -> None:
        """A host-side error (a bad argument) is raised alike by every process, which stay in step; the
        runtime's (a collective whose peer is gone, a device out of memory), raised by a call or by reading
        its results later, may strike this process only: no call can be trusted to run in step again."""
        if isinstance(error, jax.errors.JaxRuntimeError) and not self.lost:
            self.lost = f"the cluster's processes are out of step ({str(error).splitlines()[0][:300]})"
        self._steps.failed(error)

    def _ref(self, call: int, index: int | None, logits: Any) -> LogitsRef:
        ref = LogitsRef(call, index, logits)
        weakref.finalize(ref, self._forgotten.append, [call, index])
        return ref

    def close(self) -> None:
        """No more calls: the followers return from ``follow``."""
        if not self._closed:
            self._closed = True
            self._send("stop", [], {})
        getattr(self._steps, "close", lambda: None)()


# ---- a follower ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Followed:
    """What a follower did: the calls it ran, the prefill logits it still held and its last state."""

    calls: int
    held: int
    state: Any


def follow(steps: DeviceSteps, channel: Channel, settings: str) -> Followed:
    """Run the leader's device calls on ``steps`` until it stops. A call that fails here failed on the leader
    too (same program, same arguments): it is logged and the state kept as the leader's engine keeps it."""
    state: Any = None
    store: dict[int, Any] = {}  # call -> the logits it returned (alive while the leader's engine holds them)
    live: dict[int, int] = {}  # call -> its references still held on the leader
    calls = 0

    def resolve(call: int, index: int | None) -> Any:
        return store[call] if index is None else store[call][index]

    while True:
        message = json.loads(channel.receive())
        method = message["method"]
        for call, _index in message["forget"]:
            if call in live:  # (not if that call failed here only)
                live[call] -= 1
                if not live[call]:
                    del live[call], store[call]
        if method == "stop":
            return Followed(calls, len(store), state)
        args = decode(message["args"], resolve)
        if method == "hello":
            if args[0] != settings:
                raise LockstepError("this process was started with other settings than process 0:\n"
                                    f"  process 0: {args[0]}\n  here:      {settings}")
            continue
        kwargs = decode(message["kwargs"], resolve)
        calls += 1
        try:
            result = getattr(steps, method)(*([] if method in _STATELESS else [state]), *args, **kwargs)
        except Exception:  # noqa: BLE001 - the leader's engine handles the same failure
            log.exception("lockstep call %s failed (as on process 0)", method)
            continue
        if method in _STATELESS or not isinstance(result, tuple):
            state = result
            continue
        state, at = result[-1], _DEVICE_CALLS[method]
        if at is not None:
            store[message["call"]] = result[at]
            live[message["call"]] = len(result[at]) if method == "prefill_batch" else 1


__all__ = ["Channel", "Followed", "Leader", "LockstepError", "LogitsRef", "follow", "settings_digest"]
