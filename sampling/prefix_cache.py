"""The host side of the prefix cache: which token blocks have their KV in the device pool, and where.

Prompts are cut into blocks of ``block_size`` tokens at absolute positions. A cached block is keyed by
(its parent block's entry, its own tokens), so a key names the *whole* prefix up to the block's end, and
a lookup walks a prompt's blocks from the start while they are cached (vLLM's hashed-block scheme, with
exact keys instead of hashes: a Python dict compares the tuples, so there are no collisions to worry about).

Why blocks and not a radix tree over tokens: the KV lives in a fixed-shape device pool
(``[layers, blocks, kv_heads, block_size, head_dim]``, see ``sampling/steps.py``) that jitted copies move
whole blocks in and out of; a block is the unit of storage, so it is the unit of lookup too, and a block
table is a plain dict.

A *tail* is a partial block (its first 1..block_size-1 tokens) cached after a chain: a finished prompt's or
reply's last, partial block, so a request that resends the whole sequence (a retry, the next turn of a
chat) computes only what is new. A tail occupies a whole pool block and is a leaf.

Matches are token-granular at the end of a chain: where a prompt leaves the cached blocks in the middle of
a block, the cached child (a full block or a tail) that shares the most of its first tokens gives those
tokens too. A position's keys and values depend only on the tokens up to it (and prefill computes them with
the same bits however it is chunked), so the shared positions hold exactly what the prompt's own prefill
would write; the request prefills from the first differing token on, overwriting the rest of the block.
Two prompts that differ in one token near a block's end (a question number after a system prompt) then
recompute only from that token, as llama.cpp's per-slot cache does, instead of from the block's start.

Blocks come from prefill, and from decoding where it writes the KV a prefill would
(``sampling/kv_agreement.py``); a request copies the blocks it matched into its own slot, so a sequence
never writes into a block another sequence reads. Eviction is least-recently-used; a lookup or insert touches a chain leaf
first and root last, so a parent is never older than its children and evicting the oldest entry never
strands a cached child behind a missing parent.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixMatch:
    """The cached blocks that start a prompt: pool block ids and entry keys of whole blocks, in prompt
    order, then possibly a tail (a partial block: its first ``tail`` tokens match)."""

    blocks: tuple[int, ...]
    keys: tuple[int, ...]
    block_size: int
    tail: int = 0
    tail_block: int | None = None

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size + self.tail

    @property
    def pool_blocks(self) -> tuple[int, ...]:
        """The pool blocks to load, the tail's last."""
        return self.blocks if self.tail_block is None else (*self.blocks, self.tail_block)


@dataclass
class _Entry:
    key: int  # unique for the life of the index (block ids are reused after eviction; keys never are)
    block: int


class PrefixIndex:
    """Least-recently-used table of cached prompt blocks (see the module docstring). Not thread-safe: the
    engine thread alone uses it."""

    ROOT = 0  # the parent key of a prompt's first block

    def __init__(self, block_size: int, capacity: int):
        if block_size < 1 or capacity < 0:
            raise ValueError("block_size must be >= 1 and capacity >= 0")
        self.block_size, self.capacity = block_size, capacity
        self._entries: collections.OrderedDict[tuple[int, tuple[int, ...]], _Entry] = collections.OrderedDict()
        # (parent key, first k tokens) -> the names of the cached children that start so (k < block_size): a
        # partial match is then at most block_size - 1 dict lookups, however many children a parent has
        self._by_prefix: dict[tuple[int, tuple[int, ...]], dict[tuple[int, tuple[int, ...]], None]] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._keys = itertools.count(self.ROOT + 1)
        self._live: set[int] = set()
        self.evictions = 0

    @property
    def used_blocks(self) -> int:
        return len(self._entries)

    def blocks_of(self, tokens: list[int], start: int = 0, end: int | None = None) -> list[tuple[int, ...]]:
        """The full blocks of ``tokens`` from block ``start`` up to (not including) block ``end``."""
        size = self.block_size
        end = len(tokens) // size if end is None else min(end, len(tokens) // size)
        return [tuple(tokens[i * size:(i + 1) * size]) for i in range(start, end)]

    def match(self, tokens: list[int], max_blocks: int, touch: bool = True, tail_limit: int = 0) -> PrefixMatch:
        """The longest run of cached blocks that starts ``tokens`` (at most ``max_blocks``), then the most of
        the next block's tokens a cached child (full block or tail) shares, within ``tail_limit`` tokens in
        all (a partial block, ``tail``); touches them unless ``touch`` is False (a look that does not count
        as a use)."""
        parent, blocks, keys, names = self.ROOT, [], [], []
        for block_tokens in self.blocks_of(tokens, 0, max_blocks):
            entry = self._entries.get((parent, block_tokens))
            if entry is None:
                break
            names.append((parent, block_tokens))
            blocks.append(entry.block)
            keys.append(entry.key)
            parent = entry.key
        start = len(blocks) * self.block_size
        tail, partial = self._partial(parent, tokens[start:start + min(self.block_size - 1, tail_limit - start)])
        tail_block = None
        if partial is not None:
            names.append(partial)
            tail_block = self._entries[partial].block
        if touch:
            self._touch(names)
        return PrefixMatch(tuple(blocks), tuple(keys), self.block_size, tail, tail_block)

    def _partial(self, parent: int, wanted: list[int]) -> tuple[int, tuple[int, tuple[int, ...]] | None]:
        """The cached child of ``parent`` (a full block or a tail) sharing the longest run of first tokens
        with ``wanted``: ``(how many, its name)``, or ``(0, None)``."""
        for length in range(len(wanted), 0, -1):
            children = self._by_prefix.get((parent, tuple(wanted[:length])))
            if children:
                return length, next(iter(children))
        return 0, None

    def add_tail(self, parent: int, tail_tokens: tuple[int, ...]) -> tuple[int, bool] | None:
        """Make room for a tail (the first tokens of a partial block) after ``parent``: ``(pool block,
        is_new)`` as ``add`` (the block's other positions are never read: a request that loads it computes
        them first). A tail is a leaf: nothing is keyed under it."""
        if not 0 < len(tail_tokens) < self.block_size:
            raise ValueError("a tail is a partial block")
        added = self._place((parent, tail_tokens), parent)
        return None if added is None else (added[0].block, added[1])

    def add(self, parent: int, block_tokens: tuple[int, ...]) -> tuple[int, int, bool] | None:
        """Make room for the block after ``parent`` and return ``(key, pool block, is_new)``; ``is_new``
        means the caller must write the block's KV into that pool block now. ``None`` when the parent is no
        longer cached (evicted) or the pool has no blocks."""
        if len(block_tokens) != self.block_size:
            raise ValueError("only full blocks are cached")
        added = self._place((parent, block_tokens), parent)
        if added is None:
            return None
        entry, is_new = added
        self._live.add(entry.key)
        return entry.key, entry.block, is_new

    def _place(self, name: tuple[int, tuple[int, ...]], parent: int) -> tuple[_Entry, bool] | None:
        """The entry ``name`` (found, or made in a free or evicted pool block) and whether it is new."""
        if (entry := self._entries.get(name)) is not None:
            self._entries.move_to_end(name)
            return entry, False
        if parent != self.ROOT and parent not in self._live:
            return None
        if not self._free:
            if not self._entries:
                return None
            evicted_name, evicted = self._entries.popitem(last=False)
            self._forget_child(evicted_name)
            self._free.append(evicted.block)
            self._live.discard(evicted.key)
            self.evictions += 1
            if parent != self.ROOT and parent not in self._live:  # we just evicted our own parent
                return None
        entry = _Entry(next(self._keys), self._free.pop())
        self._entries[name] = entry
        for prefix in self._prefixes(name):
            self._by_prefix.setdefault(prefix, {})[name] = None
        return entry, True

    def _prefixes(self, name: tuple[int, tuple[int, ...]]) -> list[tuple[int, tuple[int, ...]]]:
        parent, tokens = name
        return [(parent, tokens[:k]) for k in range(1, min(len(tokens), self.block_size - 1) + 1)]

    def _forget_child(self, name: tuple[int, tuple[int, ...]]) -> None:
        for prefix in self._prefixes(name):
            children = self._by_prefix.get(prefix)
            if children is not None:
                children.pop(name, None)
                if not children:
                    del self._by_prefix[prefix]

    def _touch(self, names: list[tuple[int, tuple[int, ...]]]) -> None:
        for name in reversed(names):  # leaf first, root last: the root ends most recent
            self._entries.move_to_end(name)

    def touch_chain(self, tokens: list[int], blocks: int) -> None:
        """Re-touch the first ``blocks`` cached blocks of ``tokens`` root-last (after adding to a chain)."""
        self.match(tokens, blocks)

    def clear(self) -> None:
        self._entries.clear()
        self._by_prefix.clear()
        self._live.clear()
        self._free = list(range(self.capacity - 1, -1, -1))
