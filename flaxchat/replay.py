"""``flaxchat replay RESULTS.jsonl``: run each recorded result's request again (its seed included) on the
model it names, launched as recorded, and say per line whether the bits are the same; when they are not,
name the provenance parts that changed (weights, config, tokenizer, chat template, engine build, numeric
setup: ``checkpoints/provenance.py``). Slots and queue sizes are not recorded parts: the seed contract says
they change nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flaxchat.checkpoints.provenance import changed_parts
from flaxchat.llm import LLM, Result, read_results

SCHEDULING = ("slots", "queue_size", "warmup")  # launch options that must not change a seed's bits


def same_bits(recorded: Result, fresh: Result) -> bool:
    """Tokens, logprobs, text and finish reasons of every choice equal."""
    key = lambda r: [(c.token_ids, c.logprobs, c.text, c.finish_reason, c.message) for c in r.choices]  # noqa: E731
    return key(recorded) == key(fresh)


@dataclass(frozen=True)
class Verdict:
    line: int  # 1-based line of the results file
    identical: bool
    changed: tuple[str, ...]  # provenance parts that differ from the recorded ones

    def describe(self) -> str:
        if self.identical:
            return f"line {self.line}: identical"
        why = (f"changed: {', '.join(self.changed)}" if self.changed else
               "no recorded part changed (the seed contract is broken: please report it)")
        return f"line {self.line}: different ({why})"


def replay(path: str | Path, overrides: dict[str, Any] | None = None, progress: bool = False) -> list[Verdict]:
    """One verdict per result of ``path``; ``overrides``: launch options to use instead (e.g. ``slots``)."""
    results = read_results(path)
    groups: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        launch = {k: v for k, v in result.launch.items() if k not in SCHEDULING}
        groups.setdefault(repr((result.model, sorted(launch.items()))), []).append(i)
    verdicts: list[Verdict | None] = [None] * len(results)
    for positions in groups.values():
        first = results[positions[0]]
        launch = {k: tuple(v) if isinstance(v, list) else v for k, v in first.launch.items()}
        launch |= {"warmup": False} | (overrides or {})  # a rerun compiles only the steps it runs
        with LLM(first.model, **launch) as llm:
            fresh = llm.rerun([results[i] for i in positions], progress=progress)
            current = dict(llm.served.provenance)
        for i, answer in zip(positions, fresh):
            changed = tuple(changed_parts(results[i].provenance, current))
            verdicts[i] = Verdict(i + 1, same_bits(results[i], answer), changed)
    return verdicts
