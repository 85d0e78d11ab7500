"""Prefill scheduling: the queue of admitted prompts, what each takes from the prefix cache, and which prompt
tokens the next device call computes.

Host bookkeeping around ``EngineSteps``, used by the engine thread alone. ``PrefillQueue.run_one(state,
budget)`` makes one device call — a chunk of the head prompt, or the short rests of the head and the prompts
right behind it at once — after copying each new job's longest cached prefix into its slot, saves the newly
prefilled full blocks (and a complete prompt's partial last block, a tail) into the prefix pool, and returns
the prompts that are complete, with the logits of their last token. ``save_sequence`` does the same for a
finished reply where decoding writes what prefill would.

Why none of this moves a seeded reply's bits: prefill rows are identical whatever chunk size, alignment or
batch computed them (``sampling/steps.py``), and the pool holds only blocks a prefill computed or would
have computed bit for bit (``sampling/kv_agreement.py``, ``sampling/prefix_cache.py``).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax

from flaxchat.sampling.prefix_cache import PrefixIndex, PrefixMatch
from flaxchat.sampling.params import PromptTokenScore
from flaxchat.sampling.scoring import prompt_token_scores
from flaxchat.sampling.steps import DecodeState, EngineSteps

log = logging.getLogger("flaxchat.engine")


@dataclass(eq=False)
class PrefillJob:
    """A request whose prompt is being prefilled into ``slots[0]`` (its other slots are reserved)."""

    request: Any  # the engine's pending request, handed back when the prompt is complete
    prompt: list[int]
    slots: list[int]
    done: int = 0  # prompt tokens already in the slot's cache
    cached: int = 0  # of which came from the prefix cache
    chain: list[int] = field(default_factory=list)  # prefix-index keys of the prompt's cached blocks, in order
    looked_up: bool = False
    scores: list[Any] = field(default_factory=list)  # a scored prompt's ChunkScores, in order

    @property
    def rest(self) -> int:
        return len(self.prompt) - self.done

    @property
    def scored(self) -> bool:
        """Whether each prompt token's log-probability is wanted (every token is then computed, none cached)."""
        return self.request.params.prompt_logprobs is not None

    def prompt_scores(self) -> tuple[PromptTokenScore, ...] | None:
        """The complete prompt's token scores (host copies), when they were asked for."""
        if not self.scored:
            return None
        return prompt_token_scores(self.prompt, jax.device_get(self.scores), self.request.params.prompt_logprobs)


class PrefillFailed(Exception):
    """A prefill call failed: ``jobs`` were in it, ``state`` is the newest device state (possibly consumed)."""

    def __init__(self, jobs: list[PrefillJob], state: DecodeState, cause: Exception):
        super().__init__(str(cause))
        self.jobs, self.state, self.cause = jobs, state, cause


class PrefillQueue:
    """Admitted prompts in arrival order; see the module docstring."""

    def __init__(self, steps: EngineSteps, prefix: PrefixIndex, stats: collections.Counter):
        self.steps, self.prefix, self.stats = steps, prefix, stats
        self._jobs: collections.deque[PrefillJob] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[PrefillJob]:
        return iter(list(self._jobs))

    def add(self, job: PrefillJob) -> None:
        self._jobs.append(job)

    def remove(self, job: PrefillJob) -> None:
        self._jobs.remove(job)

    def run_one(self, state: DecodeState, budget: int) -> tuple[DecodeState, int, list[tuple[PrefillJob, jax.Array]]]:
        """One prefill call of at most ``budget`` tokens (a batch of short rests, or a scoring chunk, is taken whole). Returns the
        new state, the tokens computed and the completed jobs with their last-token logits (removed from the
        queue); raises ``PrefillFailed`` naming the jobs of a failed call."""
        batch = [self._jobs[0]]
        try:
            state, batch, shape = self._next_call(state)
            if shape is not None:  # each job's whole rest, in one call
                sizes = [job.rest for job in batch]
                all_logits, state = self.steps.prefill_batch(state, [(j.slots[0], j.prompt, j.done) for j in batch],
                                                             shape)
                self.stats["batched_prefills"] += 1
                self.stats[f"batched_prefills_{shape[0]}x{shape[1]}"] += 1
            elif batch[0].scored:  # one scoring chunk of the head job
                job = batch[0]
                sizes = [min(self.steps.score_chunk_size, job.rest)]
                scores, logits, state = self.steps.score_chunk(state, job.slots[0], job.prompt, job.done)
                job.scores.append(scores)
                all_logits = (logits,)
            else:  # one chunk of the head job
                job = batch[0]
                sizes = [self.steps.chunk_length(min(budget, job.rest))]
                logits, state = self.steps.prefill_chunk(state, job.slots[0], job.prompt, job.done, sizes[0])
                all_logits = (logits,)
            for job, size in zip(batch, sizes):
                job.done += size
                state = self._save_new_blocks(state, job)
        except Exception as exc:  # noqa: BLE001 - the engine decides what a failure ends
            raise PrefillFailed(batch, state, exc) from exc
        finished = []
        for job, logits in zip(batch, all_logits):
            if job.rest == 0:
                self._jobs.remove(job)
                finished.append((job, logits))
        return state, sum(sizes), finished

    def _next_call(self, state: DecodeState) -> tuple[DecodeState, list[PrefillJob], tuple[int, int] | None]:
        """The jobs of the next call and its batched shape: the head and the jobs right behind it whose rests
        fit one batched call (``EngineSteps.batch_plan``), else the head alone (shape None).

        The head takes its cached prefix when first considered; a job behind it only when it joins a batch
        (until then its rest is what the index holds now), so it still finds the blocks the head is saving."""
        head = self._jobs[0]
        if not head.looked_up:
            state = self._take_cached_prefix(state, head)
        candidates = []
        for job in self._jobs:  # no more than the slots
            if job.scored:  # a scored prompt goes alone, in scoring chunks
                break
            candidates.append(job)
        if len(candidates) < 2:
            return state, [head], None
        plan = self.steps.batch_plan([job.rest if job.looked_up else self._rest_if_looked_up(job)
                                      for job in candidates])
        if plan is None:
            return state, [head], None
        (prompts, length), taken = plan
        batch = candidates[:taken]
        for job in batch:
            if not job.looked_up:
                state = self._take_cached_prefix(state, job)
        return state, batch, (prompts, length)

    def _rest_if_looked_up(self, job: PrefillJob) -> int:
        """The tokens ``job`` would have left to compute if it took its cached prefix now."""
        if not self.prefix.capacity:
            return job.rest
        return len(job.prompt) - self._match(job.prompt, touch=False).tokens

    def _match(self, prompt: list[int], touch: bool = True) -> PrefixMatch:
        """The cached prefix a prompt can take: whole blocks and a tail, leaving >= 1 token to compute (its
        logits start the reply); no tail whose block would end past the cache (a copy there would clamp)."""
        size = self.prefix.block_size
        match = self.prefix.match(prompt, (len(prompt) - 1) // size, touch, tail_limit=len(prompt) - 1)
        if match.tail_block is not None and (len(match.blocks) + 1) * size > self.steps.max_len:
            match = PrefixMatch(match.blocks, match.keys, size)
        return match

    def _take_cached_prefix(self, state: DecodeState, job: PrefillJob) -> DecodeState:
        """Copy the longest cached prefix of the prompt into the job's slot (leaving >= 1 token to compute,
        whose logits start the reply)."""
        job.looked_up = True
        self.stats["prompt_tokens"] += len(job.prompt)
        if not self.prefix.capacity or job.scored:
            return state
        match = self._match(job.prompt)
        if match.tokens:
            state = self.steps.load_blocks(state, job.slots[0], list(match.pool_blocks))
        job.done = job.cached = match.tokens
        job.chain = list(match.keys)
        self.stats["prefix_hit_tokens"] += match.tokens
        return state

    def save_sequence(self, state: DecodeState, slot: int, tokens: list[int]) -> DecodeState:
        """Put the full blocks of ``tokens``, whose keys and values ``slot``'s cache holds (a finished reply's
        prompt and tokens, when decoding writes what prefill would: ``EngineSteps.decode_extends_prefix``),
        into the pool, so a next turn that resends the reply finds them. A failure only loses the blocks."""
        if not self.prefix.capacity:
            return state
        try:
            end = len(tokens) // self.prefix.block_size
            chain = list(self.prefix.match(tokens, end).keys)
            cached = len(chain)
            state = self._save_blocks(state, slot, tokens, chain, end)
            self.stats["reply_blocks_cached"] += len(chain) - cached
            state = self._save_tail(state, slot, tokens, chain)
        except Exception:  # noqa: BLE001
            log.exception("saving a finished reply's blocks failed")
        return state

    def _save_new_blocks(self, state: DecodeState, job: PrefillJob) -> DecodeState:
        """Put the job's newly prefilled full blocks into the pool."""
        if not self.prefix.capacity:
            return state
        state = self._save_blocks(state, job.slots[0], job.prompt, job.chain, job.done // self.prefix.block_size)
        return self._save_tail(state, job.slots[0], job.prompt, job.chain) if job.rest == 0 else state

    def _save_tail(self, state: DecodeState, slot: int, tokens: list[int], chain: list[int]) -> DecodeState:
        """The partial last block of ``tokens`` (in ``slot``'s cache) into the pool as a tail, when every
        whole block before it is cached (``chain``) and its block lies within the cache."""
        size = self.prefix.block_size
        end = len(tokens) // size
        if len(tokens) % size == 0 or len(chain) != end or (end + 1) * size > self.steps.max_len:
            return state
        added = self.prefix.add_tail(chain[-1] if chain else PrefixIndex.ROOT, tuple(tokens[end * size:]))
        if added is not None and added[1]:
            state = self.steps.save_blocks(state, slot, end, [added[0]])
        return state

    def _save_blocks(self, state: DecodeState, slot: int, tokens: list[int], chain: list[int], end: int) -> DecodeState:
        """Blocks ``len(chain) .. end - 1`` of ``tokens`` from ``slot``'s cache into the pool, their keys
        appended to ``chain`` (the keys of the blocks before them); one device copy per run of new blocks,
        blocks another request cached meanwhile are in the pool already."""
        first = len(chain)
        targets: list[int | None] = []
        for block_tokens in self.prefix.blocks_of(tokens, first, end):
            added = self.prefix.add(chain[-1] if chain else PrefixIndex.ROOT, block_tokens)
            if added is None:  # the pool cannot hold this chain any further
                break
            key, block, is_new = added
            chain.append(key)
            targets.append(block if is_new else None)
        runs: list[tuple[int, list[int]]] = []  # (first cache block, pool blocks) of consecutive new blocks
        for i, block in enumerate(targets):
            if block is None:
                continue
            if runs and runs[-1][0] + len(runs[-1][1]) == first + i:
                runs[-1][1].append(block)
            else:
                runs.append((first + i, [block]))
        for start, blocks in runs:
            state = self.steps.save_blocks(state, slot, start, blocks)
        if len(chain) > first:
            self.prefix.touch_chain(tokens, len(chain))
        return state
