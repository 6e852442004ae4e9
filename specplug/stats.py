"""One statistics type for every engine: accept lengths, acceptance, and where the time went."""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

TIMING_KEYS = ("prefill", "draft", "verify", "sample", "cache", "other")


@contextmanager
def elapsed_ms(into: dict[str, float], key: str):
    """Add the wall time of the `with` block, in ms, to into[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + (time.perf_counter() - start) * 1e3


@dataclass
class SpecStats:
    num_prompts: int = 0
    total_new_tokens: int = 0
    wall_time_s: float = 0.0
    num_drafts: int = 0  # verify steps that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # per verify step, incl. bonus
    timing_ms: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in TIMING_KEYS})
    # set by an arm that could not count drafts (why, in one line): its draft counts are not zero
    # but unknown, and readers must not take them as measured
    counts_unavailable: str | None = None
    budgets: list[int] = field(default_factory=list)  # draft tokens budgeted per step (budget on)
    # target forwards over the batch (one per decoding step), where the engine counts them (the
    # embedded engine): what per-step times divide by at any batch size
    num_steps: int = 0

    def timer(self, key: str):
        return elapsed_ms(self.timing_ms, key)

    def record_step(self, num_draft: int, num_accepted: int) -> None:
        """One verify step of one row."""
        if num_draft:
            self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        self.accept_lengths.append(num_accepted + 1)

    def to_dict(self) -> dict:
        """Every field, JSON-ready: what an engine subprocess sends back (from_dict reads it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SpecStats":
        """The inverse of to_dict; unknown keys (from a newer writer) are an error, not lost."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SpecStats.from_dict: unknown fields {unknown}")
        out = cls(**{k: v for k, v in data.items()})
        out.accept_lengths, out.budgets = list(out.accept_lengths), list(out.budgets)
        out.timing_ms = dict(out.timing_ms)
        return out

    def merge(self, other: "SpecStats") -> None:
        """Add another run's stats (one block of a benchmark arm, one engine call) into these."""
        self.num_prompts += other.num_prompts
        self.total_new_tokens += other.total_new_tokens
        self.wall_time_s += other.wall_time_s
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.accept_lengths += other.accept_lengths
        self.budgets += other.budgets
        self.num_steps += other.num_steps
        for k, v in other.timing_ms.items():
            self.timing_ms[k] = self.timing_ms.get(k, 0.0) + v
        self.counts_unavailable = self.counts_unavailable or other.counts_unavailable

    @property
    def mean_accept_length(self) -> float:
        """tau: accepted + bonus tokens per verify step (vLLM and SGLang count it so)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.total_new_tokens / self.wall_time_s if self.wall_time_s else 0.0

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accept_lengths).items()))

    def summary(self) -> dict:
        return {
            "num_prompts": self.num_prompts,
            "total_new_tokens": self.total_new_tokens,
            # microseconds: the per-turn times of a short run must add up to the whole within
            # 0.1% (tests/bench), which 0.1 ms rounding missed on 0.09 s runs
            "wall_time_s": round(self.wall_time_s, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mean_accept_length": round(self.mean_accept_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accept_length_histogram": {str(k): v for k, v in self.histogram().items()},
            "timing_ms": {k: round(v, 2) for k, v in self.timing_ms.items()},
            **({"num_steps": self.num_steps} if self.num_steps else {}),
            **({"counts_unavailable": self.counts_unavailable} if self.counts_unavailable else {}),
            **({"budget_histogram": {str(k): v for k, v in sorted(Counter(self.budgets).items())}}
               if self.budgets else {}),
        }

    def summary_line(self, label: str = "") -> str:
        t = self.timing_ms
        return (f"[BatchSummary]{' ' + label if label else ''} prompts={self.num_prompts} "
                f"new_tokens={self.total_new_tokens} wall={self.wall_time_s:.2f}s "
                f"tok/s={self.tokens_per_second:.2f} tau={self.mean_accept_length:.3f} "
                f"accept_rate={self.acceptance_rate:.3f} "
                + " ".join(f"{k}={t[k]:.0f}ms" for k in TIMING_KEYS))
