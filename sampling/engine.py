"""The engine: a thread that owns the device state and runs continuous batching over fixed slots.

``submit(prompt_ids, params) -> RequestHandle`` from any thread or asyncio loop. Requests wait in a
bounded queue; a request with ``n`` choices is admitted when ``n`` slots are free and joins the prefill
queue. Each loop iteration then

1. prefills (``sampling/prefill.py``): the request at the head of the prefill queue first takes the longest
   cached prefix of its prompt from the prefix cache (``sampling/prefix_cache.py``; KV blocks copied from the
   device pool into its slot), then runs chunks of the rest. While other choices are decoding, one iteration prefills at
   most ``prefill_chunk`` tokens, so a long prompt never stalls the live streams for longer than one chunk;
   with nothing decoding it runs a whole largest bucket. When the head and the requests behind it each have
   a short rest left, up to four rests go in one batched call. Every prefilled full block goes into the pool.
   When a prompt is done, its slot is copied into the request's other choices' slots and each choice
   samples its first token (``insert``);
2. decodes: one jitted call over the live slots (a row bucket, see ``sampling/steps.py``;
   ``steps_per_call`` steps at once unless a live choice needs the host between steps), outputs copied to
   the host once and turned into ``TokenEvent``s (text deltas, logprobs, finish reasons). Choices with a
   grammar or a thinking plan get their next-token bitmask uploaded before each decode call.

A reply's bits do not depend on how its prompt was cut into chunks or which blocks came from the cache:
prefill rows are bit-identical across chunk sizes and alignments (``sampling/steps.py``), and only prefill
ever writes pool blocks.

What callers hold (the request handle, the errors ``submit`` raises) is in ``sampling/requests.py``.

Threads: the engine thread alone owns the device state (``_state``), the slot table (``_slots``), the
prefill queue (``prefill_queue``), the prefix index and the per-choice host state (detokenizers, guides);
callers only touch the waiting queue (``_waiting``, under ``_lock``) and their ``RequestHandle``'s event
queue.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.config import ModelConfig
from flaxchat.model.tokenizer import Tokenizer
from flaxchat.sampling.closing import vocab_facts
from flaxchat.sampling.constraints import ChoiceGuide, TokenConstraint, ll_tokenizer
from flaxchat.sampling.detokenizer import IncrementalDetokenizer, StopStringFilter
from flaxchat.sampling.params import SamplingParams, TokenEvent, TokenLogprob
from flaxchat.sampling.prefill import PrefillFailed, PrefillJob, PrefillQueue
from flaxchat.sampling.prefix_cache import PrefixIndex
from flaxchat.sampling.requests import (EngineError, EngineStoppedError, PromptTooLongError, QueueFullError, RequestHandle,
                               collect_text)
from flaxchat.sampling.sampler import choice_key
from flaxchat.sampling.steps import DecodeState, EngineSteps, bitmask_words, make_row_request

log = logging.getLogger("flaxchat.engine")


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 8
    max_len: int | None = None  # cache length; default min(model context, 2048)
    queue_size: int = 64
    steps_per_call: int = 1  # decode steps per device call while no live choice needs the host between steps
    largest_prefill_bucket: int = 1024  # longer prompts are prefilled in chunks of this size
    kv_dtype: str | None = None  # KV cache storage dtype; default the model's compute dtype
    prefill_chunk: int = 128  # prompt tokens prefilled per loop iteration while other choices are decoding
    prefix_cache_mb: float = 256.0  # device memory for cached prompt blocks; 0 turns the prefix cache off
    prefix_block: int = 16  # tokens per cached block


@dataclass
class _Pending:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    seed: int


@dataclass
class _InFlight:
    """A dispatched decode call: the (slot, choice) of each of its rows, and its device outputs."""

    rows: list[tuple[int, Any]]
    outs: Any


@dataclass
class _Choice:
    """Host bookkeeping for one choice occupying one slot."""

    handle: RequestHandle
    index: int
    budget: int  # tokens this choice may still generate (max_tokens and context)
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    want_logprobs: bool
    top_logprobs: int
    guide: ChoiceGuide | None = None
    generated: int = 0
    finished: bool = field(default=False)


class Engine:
    """Continuous batching over ``slots`` fixed slots; see the module docstring."""

    def __init__(self, cfg: ModelConfig, params: Any, tokenizer: Tokenizer, config: EngineConfig = EngineConfig()):
        self.cfg, self.tokenizer, self.config = cfg, tokenizer, config
        max_len = config.max_len or min(cfg.max_position_embeddings, 2048)
        self.max_len = min(max_len, cfg.max_position_embeddings)
        if config.prefill_chunk < 1 or config.prefix_block < 1 or config.prefix_cache_mb < 0:
            raise ValueError("prefill_chunk and prefix_block must be >= 1 and prefix_cache_mb >= 0")
        kv_dtype = config.kv_dtype or cfg.dtype
        block_bytes = EngineSteps.pool_block_bytes(cfg, kv_dtype, config.prefix_block)
        pool_blocks = int(config.prefix_cache_mb * 2**20 // block_bytes)
        self.steps = EngineSteps(cfg, params, config.slots, self.max_len, config.steps_per_call,
                                 config.largest_prefill_bucket, kv_dtype, pool_blocks, config.prefix_block)
        self.stats = collections.Counter()
        self.prefix = PrefixIndex(config.prefix_block, pool_blocks)
        self.prefill_queue = PrefillQueue(self.steps, self.prefix, self.stats)
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._slots: list[_Choice | PrefillJob | None] = [None] * config.slots
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._running = False
        self._state: DecodeState | None = None
        self._inflight: _InFlight | None = None  # the decode call whose outputs the host has not read yet
        self.warmup_seconds: float | None = None
        self.fault_hook: Callable[[str], None] | None = None  # tests inject step failures here

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        started = time.perf_counter()
        ll_tokenizer(self.tokenizer, self.cfg.vocab_size)  # built once, so the first constrained request
        vocab_facts(self.tokenizer, self.cfg.vocab_size)  # does not pay for them
        self._state = self.steps.warmup()
        # The host-side helpers of a request's start run small jax ops that compile on first use (~0.3-0.7 s
        # measured): run them once now, so the first request after start is not the slow one.
        jax.block_until_ready(choice_key(0, 0))
        jax.block_until_ready(make_row_request(self.cfg.vocab_size, temperature=1.0, logit_bias={0: 1.0},
                                               prompt=[0], top_logprobs=1))
        self.warmup_seconds = time.perf_counter() - started
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="flaxchat-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; in-flight and waiting requests end with ``finish_reason='cancelled'``."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for pending in list(self._waiting):
            self._finish_all(pending.handle, pending.params.n, pending.params.choice_offset, "cancelled")
        self._waiting.clear()
        for job in self.prefill_queue:
            self._abandon(job, "cancelled")
        for slot, choice in enumerate(self._slots):
            if isinstance(choice, _Choice):
                self._emit(choice, None, "", None, (), "cancelled")
                self._slots[slot] = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def compile_count(self) -> int:
        return self.steps.compiles

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
        """Queue a request. Raises ``ValueError`` for bad settings, ``PromptTooLongError`` when the prompt
        leaves no room in the context, ``QueueFullError`` when the queue is full."""
        if not self._running:
            raise EngineStoppedError("the engine is not running")
        params.validate(self.cfg.vocab_size)
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError("the prompt contains token ids outside the vocabulary")
        if len(prompt) >= self.max_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.max_len} "
                f"(at least one position must be left for the reply)"
            )
        if params.n > self.config.slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.config.slots} slots")
        if params.grammar is not None:
            self._new_constraint(params.grammar)  # validate now: a bad grammar fails before queueing
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        handle = RequestHandle(next(self._ids), params.n, seed)
        with self._lock:
            if len(self._waiting) >= self.config.queue_size:
                raise QueueFullError(f"the request queue is full ({self.config.queue_size} waiting)")
            self._waiting.append(_Pending(handle, list(prompt), params, seed))
            self._lock.notify_all()
        return handle

    def check_grammar(self, grammar: str) -> None:
        """Raise ``ConstraintError`` naming the problem if ``grammar`` cannot be used (before any queueing)."""
        self._new_constraint(grammar)

    def _new_constraint(self, grammar: str) -> TokenConstraint:
        return TokenConstraint(ll_tokenizer(self.tokenizer, self.cfg.vocab_size), grammar,
                               bitmask_words(self.cfg.vocab_size))

    def _new_guide(self, params: SamplingParams, stop_ids: frozenset[int]) -> ChoiceGuide | None:
        if params.grammar is None and params.thinking is None:
            return None
        constraint = self._new_constraint(params.grammar) if params.grammar is not None else None
        facts = vocab_facts(self.tokenizer, self.cfg.vocab_size) if constraint is not None else None
        return ChoiceGuide(constraint, params.thinking, self.tokenizer.token_bytes, bitmask_words(self.cfg.vocab_size),
                           stop_ids, facts)

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and self.busy_slots == 0:
                    self._lock.wait(timeout=0.1)
                if not self._running:
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
        with self._lock:
            for pending in [p for p in self._waiting if p.handle.cancelled.is_set()]:
                self._waiting.remove(pending)
                self._finish_all(pending.handle, pending.params.n, pending.params.choice_offset, "cancelled")
        for job in [job for job in self.prefill_queue if job.request.handle.cancelled.is_set()]:
            self._abandon(job, "cancelled")
        for slot, choice in enumerate(self._slots):
            if isinstance(choice, _Choice) and choice.handle.cancelled.is_set():
                self._emit(choice, None, "", None, (), "cancelled")
                self._free(slot)

    def _abandon(self, job: PrefillJob, reason: str, error: str | None = None) -> None:
        """End a request that is still prefilling: its slots become free, its choices end with ``reason``."""
        self.prefill_queue.remove(job)
        for slot in job.slots:
            self._slots[slot] = None
        params = job.request.params
        self._finish_all(job.request.handle, params.n, params.choice_offset, reason, error)

    def _live_slots(self) -> list[int]:
        return [slot for slot, choice in enumerate(self._slots) if isinstance(choice, _Choice) and not choice.finished]

    def _admit(self) -> None:
        """Move waiting requests into the prefill queue while their choices fit in free slots."""
        while True:
            with self._lock:
                free = [i for i, c in enumerate(self._slots) if c is None]
                if not self._waiting or len(free) < self._waiting[0].params.n:
                    return
                pending = self._waiting.popleft()
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
                if self.fault_hook:
                    self.fault_hook("prefill")
                self._state, used, finished = self.prefill_queue.run_one(self._state, budget)
            except PrefillFailed as failure:
                log.exception("prefill failed for request(s) %s", [j.request.handle.id for j in failure.jobs])
                self._state = failure.state
                for job in failure.jobs:
                    self._abandon(job, "error", f"prefill failed: {failure.cause}")
                self._recover_state()
                continue
            except Exception as exc:  # noqa: BLE001 - a fault before the call: the head job fails
                head = next(iter(self.prefill_queue))
                log.exception("prefill failed for request %s", head.request.handle.id)
                self._abandon(head, "error", f"prefill failed: {exc}")
                self._recover_state()
                continue
            spent += used
            for job, logits in finished:
                self._start(job, logits)

    def _start(self, job: PrefillJob, logits: jax.Array) -> None:
        """The prompt is in ``job.slots[0]``: copy it to the other choices' slots, sample each first token."""
        pending, slots = job.request, job.slots
        pending.handle.cached_tokens = job.cached
        params, vocab = pending.params, self.cfg.vocab_size
        try:
            row = make_row_request(
                vocab, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
                presence=params.presence_penalty, frequency=params.frequency_penalty,
                repetition=params.repetition_penalty, logit_bias=dict(params.logit_bias), prompt=pending.prompt,
                top_logprobs=params.top_logprobs if params.logprobs else 0,
            )
            stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.tokenizer.stop_ids)
            budget = min(params.max_tokens, self.max_len - len(pending.prompt))
            firsts = []
            for i, slot in enumerate(slots):
                index = params.choice_offset + i
                guide = self._new_guide(params, stop_ids)
                mask = guide.mask(budget) if guide is not None else None
                choice_row = row if mask is None else row.replace(allowed=jnp.asarray(mask))
                if guide is not None:
                    guide.masked = mask is not None
                    self.stats["guided_choices"] += 1
                if slot != slots[0]:
                    self._state = self.steps.copy_slot(self._state, slot, slots[0])
                out, self._state = self.steps.insert(self._state, slot, logits, choice_row,
                                                     choice_key(pending.seed, index), len(pending.prompt))
                firsts.append((slot, out))
                self._slots[slot] = _Choice(
                    pending.handle, index, budget, stop_ids, IncrementalDetokenizer(self.tokenizer),
                    StopStringFilter(params.stop), params.logprobs, params.top_logprobs, guide,
                )
            host = jax.device_get([out for _, out in firsts])
        except Exception as exc:  # noqa: BLE001
            log.exception("starting request %s failed", pending.handle.id)
            for slot in slots:
                self._slots[slot] = None
            self._recover_state()
            self._finish_all(pending.handle, params.n, params.choice_offset, "error", f"prefill failed: {exc}")
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
        live = self._live_slots()
        guided = any(self._slots[slot].guide is not None for slot in live)
        if self._inflight is not None and (guided or not live):
            self._collect()
            live = self._live_slots()
            guided = any(self._slots[slot].guide is not None for slot in live)
        if not live:
            return
        try:
            if self.fault_hook:
                self.fault_hook("decode")
            started = time.perf_counter_ns()
            masks = self._next_masks()
            self.stats["mask_ns"] += time.perf_counter_ns() - started
            if masks:
                self._state = self.steps.set_allowed(self._state, masks)
            outs, self._state = self.steps.decode(self._state, live, 1 if guided else self.config.steps_per_call)
        except Exception as exc:  # noqa: BLE001
            log.exception("decode step failed")
            self._collect()
            self._fail([(slot, self._slots[slot]) for slot in live], f"decode step failed: {exc}")
            return
        self.stats["decode_calls"] += 1
        self.stats[f"decode_rows_{self.steps.row_bucket_for(len(live))}"] += 1
        previous, self._inflight = self._inflight, _InFlight([(slot, self._slots[slot]) for slot in live], outs)
        if previous is not None:
            self._collect(previous)
        if guided:
            self._collect()

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
            self._fail(inflight.rows, f"decode step failed: {exc}")
            return
        for step in range(host.tokens.shape[0]):
            for column, (slot, choice) in enumerate(inflight.rows):
                if self._slots[slot] is choice and not choice.finished:  # a stopped choice ignores later steps
                    self._on_token(slot, int(host.tokens[step, column]), host.logprobs[step, column],
                                   host.top_ids[step, column], host.top_logprobs[step, column])

    def _fail(self, rows: list[tuple[int, "_Choice"]], error: str) -> None:
        for slot, choice in rows:
            if self._slots[slot] is choice and not choice.finished:
                self._emit(choice, None, "", None, (), "error", error)
                self._free(slot)
        self._recover_state()

    def _next_masks(self) -> dict[int, np.ndarray]:
        """Masks to upload before the next step: guided rows, and rows whose restriction just ended."""
        masks = {}
        for slot, choice in enumerate(self._slots):
            if not isinstance(choice, _Choice) or choice.guide is None:
                continue
            mask = choice.guide.mask(choice.budget - choice.generated)
            if mask is not None:
                masks[slot] = mask
            elif choice.guide.masked:
                masks[slot] = np.full(bitmask_words(self.cfg.vocab_size), 0xFFFFFFFF, np.uint32)
            choice.guide.masked = mask is not None
        return masks

    def _recover_state(self) -> None:
        """After a failed step the donated state may be gone: rebuild it (only if it is)."""
        leaves = jax.tree.leaves(self._state)
        if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves):
            for job in self.prefill_queue:
                self._abandon(job, "error", "engine state was lost in a failed step")
            for slot, choice in enumerate(self._slots):
                if isinstance(choice, _Choice):
                    self._emit(choice, None, "", None, (), "error", "engine state was lost in a failed step")
                    self._slots[slot] = None
            self.prefix.clear()  # the pool's blocks are gone with the state
            self._state = self.steps.init_state()

    # ---- per-token bookkeeping -------------------------------------------------------------------
    def _on_token(self, slot: int, token: int, logprob: Any, top_ids: Any, top_lps: Any) -> None:
        choice = self._slots[slot]
        choice.generated += 1
        self.stats["tokens"] += 1
        finish, text = None, ""
        if choice.guide is not None:
            try:
                choice.guide.advance(token)
            except ValueError as exc:  # cannot happen with a correct mask; never return ungrammatical text
                self._emit(choice, token, "", None, (), "error", str(exc))
                self._free(slot)
                return
        if token in choice.stop_ids:
            finish = "stop"
        else:
            text = choice.stops.push(choice.detok.push(token))
            if choice.stops.stopped or (choice.guide is not None and choice.guide.done):
                finish = "stop"
            elif choice.generated >= choice.budget:
                finish = "length"
        if finish == "stop" and choice.guide is not None and choice.guide.closed_by_budget:
            finish = "length"  # complete, but only because its end was forced to fit max_tokens
            self.stats["closed_by_budget"] += 1
        if finish == "length" or (finish == "stop" and not choice.stops.stopped):
            text += choice.stops.push(choice.detok.flush())
            text += choice.stops.flush()
        tops: tuple[TokenLogprob, ...] = ()
        if choice.want_logprobs and choice.top_logprobs:
            tops = tuple(TokenLogprob(int(i), float(lp)) for i, lp in zip(top_ids[: choice.top_logprobs],
                                                                           top_lps[: choice.top_logprobs]))
        self._emit(choice, token, text, float(logprob) if choice.want_logprobs else None, tops, finish)
        if finish is not None:
            self._free(slot)

    def _emit(self, choice: _Choice, token: int | None, text: str, logprob: float | None,
              tops: tuple[TokenLogprob, ...], finish: str | None, error: str | None = None) -> None:
        if finish is not None:
            choice.finished = True
        choice.handle._push(TokenEvent(choice.index, token, text, logprob, tops, finish, error, choice.handle.seed))

    def _finish_all(self, handle: RequestHandle, n: int, offset: int, reason: str, error: str | None = None) -> None:
        for i in range(n):
            handle._push(TokenEvent(offset + i, None, "", finish_reason=reason, error=error, seed=handle.seed))

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        try:
            self._state = self.steps.release(self._state, slot)
        except Exception:  # noqa: BLE001
            log.exception("release failed")
            self._recover_state()


__all__ = ["Engine", "EngineConfig", "RequestHandle", "QueueFullError", "PromptTooLongError", "EngineError",
           "EngineStoppedError", "collect_text"]
