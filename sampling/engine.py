"""The engine: a thread that owns the device state and schedules requests over fixed slots.

``submit(prompt_ids, params) -> RequestHandle`` from any thread or asyncio loop (``sampling/requests.py``
has the handle and the errors). Requests wait in a bounded queue; one with ``n`` choices is admitted when
``n`` slots are free. Each loop iteration then

1. prefills (``sampling/prefill.py``): the head of the prefill queue takes the longest cached prefix of its
   prompt (``sampling/prefix_cache.py``) and runs chunks of the rest (short rests of several prompts go in one
   batched call). While choices are decoding an iteration prefills at most ``prefill_chunk`` tokens, so a
   long prompt never stalls the streams for longer than one chunk. A finished prompt is copied into its
   other choices' slots and each choice samples its first token (``insert``; ``sampling/choices.py``);
2. decodes: one call over the live slots (a row bucket; ``steps_per_call`` steps unless a live choice
   needs the host between steps), whose outputs are read while the next call runs and become
   ``TokenEvent``s. Guided choices get their next-token bitmask before each call.

The device is reached only through ``DeviceSteps`` (``sampling/device_steps.py``): the jitted
``EngineSteps`` in production, a numpy fake in the scheduler's tests. A reply's bits do not depend on
chunking, cached blocks or the other rows (``sampling/shapes.py``, ``sampling/steps.py``).

Threads: the engine thread alone owns the device state (``_state``), the slot table (``_slots``), the
prefill queue, the prefix index and every ``Choice`` (detokenizers, guides); callers touch only the waiting
queue (``_waiting``, a ``WaitingRequests`` under its lock) and their own handle's event queue.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from flaxchat.model.config import ModelConfig
from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.choices import Choice, ChoiceMaker
from flaxchat.sampling.device_steps import DeviceLost, DeviceSteps
from flaxchat.sampling.params import SamplingParams
from flaxchat.sampling.prefill import PrefillFailed, PrefillJob, PrefillQueue
from flaxchat.sampling.prefix_cache import PrefixIndex
from flaxchat.sampling.requests import RequestHandle, WaitingRequests, check_prompt, choice_groups
from flaxchat.sampling.sampler import choice_key
from flaxchat.sampling.shapes import DEFAULT_CONTEXT, LARGEST_PREFILL_BUCKET
from flaxchat.sampling.steps import DecodeState, EngineSteps

log = logging.getLogger("flaxchat.engine")


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 8
    max_len: int | None = None  # cache length; default min(model context, DEFAULT_CONTEXT)
    queue_size: int = 64
    steps_per_call: int = 1  # decode steps per device call while no live choice needs the host between steps
    largest_prefill_bucket: int = LARGEST_PREFILL_BUCKET  # longer prompts are prefilled in chunks of this size
    kv_dtype: str | None = None  # KV cache storage dtype; default the model's compute dtype
    prefill_chunk: int = 128  # prompt tokens prefilled per loop iteration while other choices are decoding
    prefix_cache_mb: float = 256.0  # device memory for cached prompt blocks; 0 turns the prefix cache off
    prefix_block: int = 16  # tokens per cached block
    warmup: bool = True  # compile every step at start (a server never compiles while serving); False: on first use
    mesh: str | None = None  # "data=2,model=4" (model/sharding.py); default: every local device on "model" if it divides the heads


def context_length(cfg: ModelConfig, config: EngineConfig) -> int:
    """Cache positions per slot: ``config.max_len``, else the model's up to ``DEFAULT_CONTEXT``."""
    return min(config.max_len or min(cfg.max_position_embeddings, DEFAULT_CONTEXT), cfg.max_position_embeddings)


@dataclass
class _InFlight:
    """A dispatched decode call: the (slot, choice) of each of its rows, and its device outputs."""
    rows: list[tuple[int, Any]]
    outs: Any


class Engine:
    """Continuous batching over ``slots`` fixed slots; see the module docstring."""

    def __init__(self, cfg: ModelConfig, params: Any, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 steps: DeviceSteps | None = None):
        """``steps``: the device steps to schedule (default: ``EngineSteps`` compiled for ``params``)."""
        self.cfg, self.tokenizer, self.config = cfg, tokenizer, config
        self.max_len = context_length(cfg, config)
        if config.prefill_chunk < 1 or config.prefix_block < 1 or config.prefix_cache_mb < 0:
            raise ValueError("prefill_chunk and prefix_block must be >= 1 and prefix_cache_mb >= 0")
        self.steps = steps = steps or EngineSteps.for_engine(cfg, params, self.max_len, config)
        self.choices = ChoiceMaker(tokenizer, cfg.vocab_size, self.max_len)
        self.stats = collections.Counter()
        self.prefix = PrefixIndex(steps.block_size, steps.pool_blocks)
        self.prefill_queue = PrefillQueue(self.steps, self.prefix, self.stats)
        self._waiting = WaitingRequests(config.queue_size)
        self._slots: list[Choice | PrefillJob | None] = [None] * config.slots
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._state: DecodeState | None = None
        self._inflight: _InFlight | None = None  # the decode call whose outputs the host has not read yet
        self.warmup_seconds: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, progress: bool = False) -> "Engine":
        """Compile every step (``progress``: a bar of them on stderr; with ``config.warmup`` False only the KV
        agreement check, the rest on first use), then run the loop on its own thread."""
        started = time.perf_counter()
        self.choices.prepare()
        self._state = self.steps.warmup(progress, compile_all=self.config.warmup)
        self.warmup_seconds = time.perf_counter() - started
        self._waiting.open = True
        self._thread = threading.Thread(target=self._loop, name="flaxchat-engine", daemon=True)
        self._thread.start()
        # A script that ends with the engine running: stop it before the interpreter finalizes, or the
        # daemon thread is torn down inside a device call (C++ frames; the process aborts).
        atexit.register(_stop_if_alive, weakref.ref(self))
        return self

    def drain(self) -> None:
        """The server is going away: waiting requests end now (``finish_reason='cancelled'``) and new ones are
        refused, while those already prefilling or decoding run to their end (then ``stop``)."""
        self._waiting.refuse()

    def stop(self) -> None:
        """Stop the loop; in-flight and waiting requests end with ``finish_reason='cancelled'``."""
        self._waiting.close("cancelled")
        if self._thread is not None:
            self._thread.join()
        self._end_started("cancelled")
        self.steps.close()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def compile_count(self) -> int:
        return self.steps.compiles

    @property
    def healthy(self) -> bool:
        return self._waiting.open and self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why the engine thread died, if it did."""
        return self._waiting.failure

    @property
    def busy_slots(self) -> int:
        return sum(c is not None for c in self._slots)

    @property
    def prefix_cache_bytes(self) -> int:
        """Device bytes of prompt blocks held in the prefix cache."""
        return self.prefix.used_blocks * self.steps.block_bytes

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # ---- submission ------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams = SamplingParams()) -> RequestHandle:
        """Queue a request (more choices than slots: in groups, ``choice_groups``). Raises ``ValueError`` for bad
        settings, ``PromptTooLongError`` when the prompt leaves no room, ``QueueFullError`` when the queue is full."""
        params.validate(self.cfg.vocab_size)
        check_prompt(prompt, self.cfg.vocab_size, self.max_len)
        if params.grammar is not None:
            self.choices.compiled(params.grammar)  # validate now: a bad grammar fails before queueing
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        handle = RequestHandle(next(self._ids), params.n, seed)
        self._waiting.add(choice_groups(handle, prompt, params, self.config.slots))
        return handle

    def check_grammar(self, grammar: str) -> None:
        """Raise ``ConstraintError`` naming the problem if ``grammar`` cannot be used (before any queueing)."""
        self.choices.compiled(grammar)

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        """The engine thread. If it dies of what the loop cannot survive, every request ends with an error and
        the engine reports itself stopped (``failure``), so no caller is left waiting."""
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001
            log.critical("the engine thread died", exc_info=True)
            self._waiting.close("error", f"the engine stopped: {exc!r}")
            self._end_started("error", self.failure)

    def _serve(self) -> None:
        while True:
            if self.steps.lost:  # no step can run again: stop (``_loop`` ends every request), not fail each one
                raise DeviceLost(self.steps.lost)
            with self._waiting.lock:
                while self._waiting.open and not self._waiting and self.busy_slots == 0:
                    self._waiting.lock.wait(timeout=0.1)
                if not self._waiting.open:
                    self._collect()  # tokens already computed still reach their streams
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self.prefill_queue:
                    self._prefill()
                if self._live_slots() or self._inflight is not None:
                    self._decode()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine loop error")

    def _drop_cancelled(self) -> None:
        self._waiting.drop_cancelled()
        for job in [job for job in self.prefill_queue if job.request.handle.cancelled.is_set()]:
            self._abandon(job, "cancelled")
        for slot, choice in enumerate(self._slots):
            if isinstance(choice, Choice) and choice.handle.cancelled.is_set():
                self._end(choice, "cancelled")
                self._free(slot)

    def _abandon(self, job: PrefillJob, reason: str, error: str | None = None) -> None:
        """End a request that is still prefilling: its slots become free, its choices end with ``reason``."""
        self.prefill_queue.remove(job)
        for slot in job.slots:
            self._slots[slot] = None
        job.request.finish(reason, error)

    def _end_started(self, reason: str, error: str | None = None) -> None:
        """End every prefilling request and every choice in a slot (the engine stops, or its state is lost)."""
        for job in list(self.prefill_queue):
            self._abandon(job, reason, error)
        for slot, choice in enumerate(self._slots):
            if isinstance(choice, Choice):
                self._end(choice, reason, error)
                self._slots[slot] = None

    def _live_slots(self) -> list[int]:
        return [slot for slot, choice in enumerate(self._slots) if isinstance(choice, Choice) and not choice.finished]

    def _admit(self) -> None:
        """Move waiting requests into the prefill queue while their choices fit in free slots."""
        while True:
            free = [i for i in self.steps.slot_order if self._slots[i] is None]
            pending = self._waiting.pop_fitting(len(free))
            if pending is None:
                return
            job = PrefillJob(pending, pending.prompt, free[: pending.params.n])
            for slot in job.slots:
                self._slots[slot] = job
            self.prefill_queue.add(job)

    def _prefill(self) -> None:
        """Spend one iteration's prefill budget on the prefill queue (``sampling/prefill.py``), head first;
        start the prompts that are complete.

        The budget is ``prefill_chunk`` tokens while any choice is decoding (re-checked after each call, as
        a finished prompt starts decoding), else one largest bucket."""
        spent = 0
        while self.prefill_queue:
            budget = (self.config.prefill_chunk if self._live_slots() else self.steps.buckets[-1]) - spent
            if budget <= 0:
                return
            try:
                self._state, used, finished = self.prefill_queue.run_one(self._state, budget)
            except Exception as exc:  # noqa: BLE001 - the call's jobs fail (the head's, before any call)
                failure = exc if isinstance(exc, PrefillFailed) else PrefillFailed([next(iter(self.prefill_queue))],
                                                                                   self._state, exc)
                log.exception("prefill failed for request(s) %s", [j.request.handle.id for j in failure.jobs])
                self._state = failure.state
                for job in failure.jobs:
                    self._abandon(job, "error", f"prefill failed: {failure.cause}")
                self._recover_state(failure.cause)
                continue
            spent += used
            for job, logits in finished:
                self._start(job, logits)

    def _start(self, job: PrefillJob, logits: jax.Array) -> None:
        """The prompt is in ``job.slots[0]``: copy it to the other choices' slots, sample each first token."""
        pending, slots, params = job.request, job.slots, job.request.params
        try:
            if pending.first:
                pending.handle.cached_tokens, pending.handle.prompt_logprobs = job.cached, job.prompt_scores()
            if params.max_tokens == 0:  # the prompt's scores were all that was asked for
                for slot in slots:
                    self._slots[slot] = None
                return pending.finish("length")
            row = self.choices.row(params, pending.prompt)
            firsts = []
            for i, slot in enumerate(slots):
                choice, choice_row = self.choices.choice(pending.handle, params, pending.prompt,
                                                         params.choice_offset + i, row)
                self.stats["guided_choices"] += choice.guide is not None
                if slot != slots[0]:
                    self._state = self.steps.copy_slot(self._state, slot, slots[0])
                out, self._state = self.steps.insert(self._state, slot, logits, choice_row,
                                                     choice_key(pending.handle.seed, choice.index), len(pending.prompt))
                firsts.append((slot, out))
                self._slots[slot] = choice
            host = jax.device_get([out for _, out in firsts])
        except Exception as exc:  # noqa: BLE001
            log.exception("starting request %s failed", pending.handle.id)
            for slot in slots:
                self._slots[slot] = None
            self._recover_state(exc)
            pending.finish("error", f"prefill failed: {exc}")
            return
        self.stats["requests"] += 1
        for (slot, _), out in zip(firsts, host):
            self._on_token(slot, int(out.tokens[0]), out.logprobs[0], out.top_ids[0], out.top_logprobs[0])

    def _decode(self) -> None:
        """One decode call over the live slots (a row bucket): several steps at once unless a live choice
        needs the host between steps (a grammar or thinking mask).

        The host reads a call's outputs while the next call runs: the call is dispatched first, then the
        previous call's tokens are turned into events. A choice that the previous tokens finish has one
        wasted step in the call already running; its outputs are dropped (rows never affect each other, so
        nothing else changes). Guided choices need their tokens before the next mask, so with one live the
        engine reads each call before dispatching the next.
        """
        live, guided = self._live_and_guided()
        if self._inflight is not None and (guided or not live):
            self._collect()
            live, guided = self._live_and_guided()
        if not live:
            return
        try:
            started = time.perf_counter_ns()
            masks = self._next_masks()
            self.stats["mask_ns"] += time.perf_counter_ns() - started
            if masks:
                self._state = self.steps.set_allowed(self._state, masks)
            outs, self._state = self.steps.decode(self._state, live, 1 if guided else self.config.steps_per_call)
        except Exception as exc:  # noqa: BLE001
            log.exception("decode step failed")
            self._collect()
            self._fail([(slot, self._slots[slot]) for slot in live], f"decode step failed: {exc}", exc)
            return
        self.stats["decode_calls"] += 1
        self.stats[f"decode_rows_{self.steps.row_bucket_for(len(live))}"] += 1
        previous, self._inflight = self._inflight, _InFlight([(slot, self._slots[slot]) for slot in live], outs)
        if previous is not None:
            self._collect(previous)
        if guided:
            self._collect()

    def _live_and_guided(self) -> tuple[list[int], bool]:
        """The live slots, and whether any of them needs the host between steps."""
        live = self._live_slots()
        return live, any(self._slots[slot].guide is not None for slot in live)

    def _collect(self, inflight: "_InFlight | None" = None) -> None:
        """Read a decode call's outputs (default: the one in flight) and turn them into token events, for
        the choices that still hold their slots and have not finished."""
        if inflight is None:
            inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        try:
            host = jax.device_get(inflight.outs)
        except Exception as exc:  # noqa: BLE001
            log.exception("decode step failed")
            self._fail(inflight.rows, f"decode step failed: {exc}", exc)
            return
        for step in range(host.tokens.shape[0]):
            for column, (slot, choice) in enumerate(inflight.rows):
                if self._slots[slot] is choice and not choice.finished:  # a stopped choice ignores later steps
                    self._on_token(slot, int(host.tokens[step, column]), host.logprobs[step, column],
                                   host.top_ids[step, column], host.top_logprobs[step, column])

    def _fail(self, rows: list[tuple[int, "Choice"]], error: str, cause: Exception) -> None:
        for slot, choice in rows:
            if self._slots[slot] is choice and not choice.finished:
                self._end(choice, "error", error)
                self._free(slot)
        self._recover_state(cause)

    def _next_masks(self) -> dict[int, np.ndarray]:
        """Masks to upload before the next step: guided rows, and rows whose restriction just ended."""
        masks = {slot: choice.next_mask(self.choices.words) for slot, choice in enumerate(self._slots) if isinstance(choice, Choice)}
        return {slot: mask for slot, mask in masks.items() if mask is not None}

    def _recover_state(self, error: Exception) -> None:
        """After a failed step (or a failed read of its results: ``error``) the donated state may be gone:
        rebuild it (only if it is). The steps judge first whether any step can run again; where none can
        (a cluster out of step), the loop stops the engine instead."""
        self.steps.failed(error)
        if self.steps.lost:
            return
        leaves = jax.tree.leaves(self._state)
        if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves):
            self._end_started("error", "engine state was lost in a failed step")
            self.prefix.clear()  # the pool's blocks are gone with the state
            self._state = self.steps.init_state()

    # ---- per-token bookkeeping -------------------------------------------------------------------
    def _on_token(self, slot: int, token: int, logprob: Any, top_ids: Any, top_lps: Any) -> None:
        choice = self._slots[slot]
        self.stats["tokens"] += 1
        event = choice.accept(token, logprob, top_ids, top_lps)
        choice.handle._push(event)
        if event.finish_reason is not None:
            self.stats["closed_by_budget"] += event.finish_reason == "length" and choice.closed_by_budget
            self.stats["content_filtered"] += event.finish_reason == "content_filter"
            if self.steps.decode_extends_prefix:  # its last token's KV is not in the slot
                self._state = self.prefill_queue.save_sequence(self._state, slot, choice.sequence[:-1])
            self._free(slot)

    def _end(self, choice: Choice, reason: str, error: str | None = None) -> None:
        choice.handle._push(choice.end(reason, error))

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        try:
            self._state = self.steps.release(self._state, slot)
        except Exception as exc:  # noqa: BLE001
            log.exception("release failed")
            self._recover_state(exc)


def _stop_if_alive(engine_ref: "weakref.ref[Engine]") -> None:
    engine = engine_ref()
    if engine is not None and engine._thread is not None and engine._thread.is_alive():
        engine.stop()


__all__ = ["Engine", "EngineConfig", "context_length"]
