"""The static shapes the engine's device steps compile for, and why each keeps a row's bits.

Row buckets keep the seed contract only where a row's bits do not depend on the bucket size. The model's
and the sampler's sums run in a fixed order (``model/reductions.py``: XLA:CPU's own reductions round
differently for different row counts), the quantised weights' decode kernel computes each row on its
own (``model/quant.py``), and float32 products keep a row's bits from 2 rows up; so buckets start at 1 row
with int8/int4 weights and at 2 with float32 (``smallest_row_bucket``). ``tests/test_row_buckets.py`` checks
every bucket size against the largest.

Prefill chunks have the same property from ``smallest_prefill_bucket`` rows up: a prompt row's keys,
values and logits are bit-identical whatever chunk size computed it and wherever the chunk started. That is
what lets the prefix cache (``sampling/prefix_cache.py``) hand a request KV blocks that another request's
prefill computed, and lets the engine cut prompts into chunks as it likes, without moving a seeded reply's
bits. ``tests/test_prefix_cache.py`` checks every bucket at odd alignments.
"""

from __future__ import annotations

from flaxchat.model.config import ModelConfig
from flaxchat.model.quant import rows_independent


def row_buckets(slots: int, smallest: int) -> tuple[int, ...]:
    """Decode bucket sizes: powers of two from ``smallest`` below ``slots``, then ``slots`` itself."""
    buckets, size = [], smallest
    while size < slots:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (slots,)


def smallest_row_bucket(cfg: ModelConfig) -> int:
    """The smallest decode bucket whose rows are bit-identical to the same rows in any larger bucket.

    With fixed-order sums (``model/reductions.py``) only the matmuls can depend on the row count. The
    quantised weights' kernel computes each row on its own (``model/quant.py``), so any bucket works, one row
    included; float32 products on XLA:CPU take another path at one row, so they start at 2.
    """
    return 1 if rows_independent(cfg) else 2


def smallest_prefill_bucket(cfg: ModelConfig) -> int:
    """The smallest prefill chunk whose rows are bit-identical to the same rows computed in any larger chunk.

    Measured on XLA:CPU (bench/RESULTS.md): a float32 ``[M, K] x [K, N]`` product's rows change between
    M < 64 and M >= 64 (another kernel), so float32 prefill chunks are padded to at least 64 rows. The
    quantised weights' kernel (``model/quant.py``) computes each row on its own, so any chunk would do; 4
    rows is the smallest bucket worth a program: a cached prompt's last token or two (a repeated system
    prompt, a retried request) cost ~20 ms in 4 rows against ~45 in 16 (default model, int4).
    """
    return 4 if rows_independent(cfg) else 64


DEFAULT_CONTEXT = 2048  # cache positions per slot unless configured (and at most the model's context)
LARGEST_PREFILL_BUCKET = 1024  # the longest prefill call; longer prompts go in chunks
# Batched prefill calls: (prompts, tokens per prompt). (16, 2) takes a crowd of repeated prompts (retries, a
# shared system prompt asked the same questions again: the prefix cache leaves each its last token) in one
# call of 32 rows (it was (16, 4): 64 rows, ~157 ms on the default model). Not (16, 1): one position per row
# is what the model takes for a decode step (float activations where prompt chunks may use int8 ones, and
# the blockwise attention's decode arithmetic), so its rows would not be a prompt chunk's bits. The others
# take the short rests of a few prompts (4 x 8: prompts that leave a cached one a few tokens before its end).
# A shape runs only where its product has enough rows to keep a row's bits (``batch_shapes``).
BATCH_PREFILL_SHAPES = ((16, 2), (4, 4), (4, 8), (4, 16), (4, 32))
CALL_COST_ROWS = 8  # a device call's fixed cost in prompt rows (int4 on CPU: ~15 ms, against ~2 ms a row)
# What a bucket's padding row costs, in real rows, where the CPU kernels skip padding (``Transformer``'s
# ``valid``): XLA's elementwise work on it remains. Timed on the default model (int4, int8 KV, 16 cached
# positions): 4 real rows took 16.5 ms in a 4-row call, 24.0 in 64 and 45.3 in 256; 64 real rows 137 ms in a
# 64-row call and 142.5 in 256 (0.11-0.21 ms a padding row, against ~2 ms a real one). So a rest of 25 tokens
# takes one 64-row call, while 128 still go as 64 + 64 (128 in a 256-row call measured 285-293 ms against
# 2 x 102-126). Elsewhere (float weights, GPU/TPU) a padding row costs a real one.
SKIPPED_PADDING_COST = 0.1


def prefill_buckets(max_len: int, smallest: int = 4, largest: int = LARGEST_PREFILL_BUCKET) -> tuple[int, ...]:
    """Powers of four from ``smallest`` up to min(max_len, largest); longer prompts go in chunks.

    Every bucket is a compiled program of the whole model (seconds of warm-up each), and since a prompt can
    be cut anywhere without moving its bits, a prompt that would waste most of a bucket is cut into
    smaller calls instead (the cheapest split: ``first_chunks``): four buckets cover what seven powers of
    two did."""
    buckets, size = [], smallest
    while size < min(max_len, largest):
        buckets.append(size)
        size *= 4
    buckets.append(min(max_len, largest))
    return tuple(buckets)


def batch_shapes(slots: int, smallest: int, largest: int) -> tuple[tuple[int, int], ...]:
    """The ``BATCH_PREFILL_SHAPES`` an engine compiles: at most ``slots`` prompts (more could never wait at
    once), at least 2, with ``prompts x tokens >= smallest`` rows (the smallest prefill bucket: fewer rows
    would move a row's bits) and fewer tokens than the largest bucket."""
    shapes = {(min(prompts, slots), length) for prompts, length in BATCH_PREFILL_SHAPES}
    return tuple(sorted(((p, n) for p, n in shapes if p >= 2 and p * n >= smallest and n < largest),
                        key=lambda shape: (shape[0] * shape[1], shape)))


def first_chunks(buckets: tuple[int, ...], longest: int, call_cost: int = CALL_COST_ROWS,
                 padding_cost: float = 1.0) -> tuple[int, ...]:
    """For every count ``n`` of prompt tokens to go (0 .. ``longest``), how many the next prefill call should
    take: the first call of the cheapest split of ``n`` into calls of these buckets, a call costing
    ``call_cost`` rows plus its real rows plus ``padding_cost`` per padding row; on a tie, the split with
    fewer rows, then the larger first call.

    Where padding costs a real row (``padding_cost`` 1: float weights, no CPU kernels) a bucket only helps
    when it is well filled: a 9-token rest runs as one 16-row call rather than 4 + 4 + 1, 25 tokens as
    16 + 16 rather than one 64-row call. Where the kernels skip padding (``SKIPPED_PADDING_COST``) the
    fewest calls win, nearly: 25 tokens after a 1,500-token conversation take one 64-row call (91 ms, against
    100 for 16 + 16 and 188 for a 64-row call that computes its padding). Splitting never moves a row's bits
    (``smallest_prefill_bucket``).
    """
    cost = [(0.0, 0)] * (longest + 1)  # (cost, rows) of the cheapest split of n tokens
    first = [0] * (longest + 1)
    for n in range(1, longest + 1):
        options = []
        for b in buckets:
            taken, before = min(b, n), cost[max(n - b, 0)]
            options.append((call_cost + taken + padding_cost * (b - taken) + before[0], b + before[1], -taken))
        total, rows, negative_first = min(options)
        cost[n], first[n] = (total, rows), -negative_first
    return tuple(first)


def batch_plan(shapes: tuple[tuple[int, int], ...], rests: list[int], padding_cost: float = 1.0
               ) -> tuple[tuple[int, int], int] | None:
    """The batched call for the prompts at the head of the queue, whose remaining tokens are ``rests`` (in
    queue order): ``(shape, how many of them)``, or None when no shape takes two or more.

    A shape takes the leading prompts whose rests fit its length, up to its prompt count; the plan is the
    one with the lowest cost per prompt taken (a call's fixed cost, ``CALL_COST_ROWS``, plus its real rows
    plus ``padding_cost`` per padding row, as in ``first_chunks``), the smaller shape on a tie."""
    best: tuple[float, tuple[int, int], int] | None = None
    for prompts, length in shapes:
        taken = 0
        while taken < min(prompts, len(rests)) and rests[taken] <= length:
            taken += 1
        if taken >= 2:
            real = sum(rests[:taken])
            cost = (CALL_COST_ROWS + real + padding_cost * (prompts * length - real)) / taken
            if best is None or cost < best[0]:
                best = (cost, (prompts, length), taken)
    return None if best is None else best[1:]
