"""Chi-square checks that sampled tokens follow a target's exact distribution, shared by the
verify unit tests and the engine-level sampling tests.

Tokens at positions 0..k-1 are checked one position at a time, conditionally: the samples are
grouped by the tokens before the position (their prefix), and each group's next-token counts are
compared with count(prefix) * p(. | prefix).  A biased sampler at any position, after any
prefix, shows; the per-group statistics add up, and so do their degrees of freedom.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable

import numpy as np
from scipy.stats import chi2

MIN_EXPECTED = 5.0  # cells expecting fewer are pooled within their group


def chi_square(groups) -> tuple[float, int, float]:
    """groups: iterable of (observed counts, expected counts) arrays over one group's cells.
    Returns (statistic, degrees of freedom, p-value) over all groups together."""
    stat, df = 0.0, 0
    for obs, exp in groups:
        obs, exp = np.asarray(obs, float), np.asarray(exp, float)
        keep = exp >= MIN_EXPECTED
        obs = np.append(obs[keep], obs[~keep].sum())
        exp = np.append(exp[keep], exp[~keep].sum())
        if exp[-1] < 1e-12:  # nothing pooled: drop the empty cell (an observation there is
            if obs[-1] > 0:  # a token the target gives probability ~0: infinitely unlikely
                return float("inf"), max(df, 1), 0.0
            obs, exp = obs[:-1], exp[:-1]
        if len(exp) < 2:
            continue
        stat += float(((obs - exp) ** 2 / exp).sum())
        df += len(exp) - 1
    return stat, df, float(chi2.sf(stat, df)) if df else 1.0


def goodness_of_fit_p(samples, probs) -> float:
    """p-value that `samples` (token ids) were drawn from `probs` [vocab] (one group of
    `chi_square`); a token of probability ~0 gives p = 0."""
    probs = np.asarray(probs, float)
    counts = np.bincount(np.asarray(samples, int), minlength=len(probs))
    return chi_square([(counts, probs / probs.sum() * len(samples))])[2]


def conditional_chi_square(samples: list[list[int]], positions: int,
                           probs: Callable[[list[tuple[int, ...]]], dict]) -> dict:
    """samples: token sequences (each at least `positions` long).  probs(prefixes) -> {prefix:
    probability vector over the vocabulary} for the exact next-token law after each prefix.
    Returns per-position and overall (stat, df, p) plus how many samples each position used."""
    groups_at = []
    for k in range(positions):
        nxt: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for s in samples:
            nxt[tuple(s[:k])][s[k]] += 1
        groups_at.append(nxt)
    law = probs([prefix for nxt in groups_at for prefix in nxt])
    out, everything = {}, []
    for k, nxt in enumerate(groups_at):
        groups = []
        for prefix, counts in nxt.items():
            p = np.asarray(law[prefix], float)
            obs = np.zeros(len(p))
            for tok, c in counts.items():
                obs[tok] = c
            groups.append((obs, p * sum(counts.values())))
        everything += groups
        out[f"position_{k}"] = chi_square(groups)
    out["all"] = chi_square(everything)
    return out
