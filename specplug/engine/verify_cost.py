"""The speculation budget's cost model, measured at start-up: the embedded engine times its own
verify forward at every width it may use, before the first request runs.

Learnt online only, the model knew nothing until drafted steps of several widths had run, so
a fresh budget paid for exploring: at batch 32 (MT-Bench, bf16, 32 new tokens a request) its
arms drafted on steps that a measured cost would have left plain, and ran at 0.83-0.88x of
plain decoding.  Timing the widths 0..gamma over a context as long as the prompts costs a few
forwards once per engine; the online fit then takes over (the seeds stay in it at a small
weight, see LinearCost.seed).
"""
from __future__ import annotations

import time

import torch

from ..sampling import greedy_tokens
from .kv import SlotCache

TIMED_RUNS = 2  # per width, after one untimed run of the widest block


def measure_verify_costs(forward, device: torch.device, rows: int, context: int,
                         max_drafts: int) -> dict[int, float]:
    """{tokens fed: ms} for verify blocks of `rows` rows and 1..1 + max_drafts tokens a row over
    a cached context of `context` tokens.  forward(cache, ids, positions, real) -> (logits,
    features) is the engine's target call (features included: they are part of its cost)."""
    cache = SlotCache(1, device)
    ids = torch.zeros(1, context, dtype=torch.long, device=device)  # any token: cost only
    positions = torch.arange(context, device=device)[None]
    forward(cache, ids, positions, torch.ones_like(ids, dtype=torch.bool))
    cache.commit([list(range(context))])
    cache.select_rows([0] * rows)  # every row the same context: one prompt's prefill, not rows'
    width = cache.width
    costs = {}
    for drafts in [max_drafts] + list(range(max_drafts + 1)):  # the first run allocates
        block = torch.zeros(rows, 1 + drafts, dtype=torch.long, device=device)
        block_pos = context + torch.arange(1 + drafts, device=device).expand(rows, -1)
        real = torch.ones_like(block, dtype=torch.bool)
        times = []
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            logits, _ = forward(cache, block, block_pos, real)
            greedy_tokens(logits)  # verification reads every fed token's logits
            times.append((time.perf_counter() - start) * 1e3)
            cache.crop(width)
        costs[rows * (1 + drafts)] = sum(times) / len(times)
    return costs
