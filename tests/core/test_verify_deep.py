"""Lossless sampling below the root: depth-3 trees, a distinct target distribution per node,
several sampled children per node, chains with draft_probs and with point masses, ragged batches.

The target is a prefix model: P(. | prefix) is its own random distribution for every prefix, so
a node judged with any other node's distribution (a row, node or sibling index off by one) shows.
Each draw runs one verify step over a ragged batch and completes every row to 3 tokens with
exact samples from P; the joint law of those 3 tokens must be P(t1) P(t2 | t1) P(t3 | t1 t2)
whatever the step accepted.  One chi-square over every row's 64 cells (df summed over rows).

Power, measured: each deliberately broken verifier below is run through the same test at the
same sample size (DRAWS) and must be rejected at ALPHA ("always accept", "resample from p
instead of the residual", "accept with p(x) when q is not a point mass", "skip the residual at
depth 2", "use the sibling's distribution").  Over 10 seeds per mutant (measure_verify_power.py,
verify_deep_power.json) all 50 runs rejected; the power at each run's own noncentrality was
>= 0.9999 every time, and the weakest mutant (skip the residual at depth 2) still had
chi-square >= 372 on 100 degrees of freedom (the 0.001 critical value is 149).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sampling_checks import chi_square
from scipy.stats import chi2, ncx2

from specplug.types import PAD, DraftProposal, VerifyResult
from specplug.verify import verify_sampled_tree

VOCAB = 4
LENGTH = 3  # tokens whose joint law is checked
DRAWS = 2000
ALPHA = 1e-3


class PrefixModel:
    """P(. | prefix): a distinct distribution per prefix, drawn once and cached."""

    def __init__(self, seed: int, sharpness: float):
        self.seed, self.sharpness, self.cache = seed, sharpness, {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:  # [VOCAB] float64
        if prefix not in self.cache:
            g = torch.Generator().manual_seed(hash((self.seed,) + prefix) % 2**31)
            logits = torch.randn(VOCAB, generator=g, dtype=torch.float64) * self.sharpness
            self.cache[prefix] = torch.softmax(logits, -1)
        return self.cache[prefix]


TARGET = PrefixModel(1, 1.6)
DRAFT = PrefixModel(2, 1.2)  # overlaps the target partly: some drafts accepted, some not


def _tree(ctx, branching, gen, sampled):
    """Children of each node level by level: sampled i.i.d. from the draft (with draft_probs) or
    the draft's top-b (point masses).  Returns tokens, parents, draft_probs rows (BFS order)."""
    tokens, parents, probs, paths = [], [], [], []
    frontier = [(-1, ())]
    for b in branching:
        nxt = []
        for node, path in frontier:
            q = DRAFT(ctx + path)
            kids = (torch.multinomial(q, b, replacement=True, generator=gen) if sampled
                    else torch.topk(q, b).indices)
            for x in kids.tolist():
                tokens.append(x)
                parents.append(node)
                probs.append(q if sampled else torch.nn.functional.one_hot(
                    torch.tensor(x), VOCAB).double())
                paths.append(path + (x,))
                nxt.append((len(tokens) - 1, path + (x,)))
        frontier = nxt
    return tokens, parents, probs, paths


# (context, branching per level, sampled) per row; chains have branching 1 at every level
BATCH_WITH_PROBS = [((0,), (2, 2, 1), True), ((1,), (1, 1, 1), True), ((2,), (1, 1), False)]
BATCH_POINT_MASSES = [((3,), (2, 2, 1), False), ((0, 1), (1, 1, 1), False), ((2, 2), (1,), False)]


def _step(rows, gen, with_probs):
    """One ragged batch: proposal and the target distribution of every node."""
    built = [(ctx, _tree(ctx, br, gen, sampled)) for ctx, br, sampled in rows]
    width = max(len(t[0]) for _, t in built)
    tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
    parents = torch.full((len(rows), width), -1, dtype=torch.long)
    draft_probs = torch.full((len(rows), width, VOCAB), 1.0 / VOCAB, dtype=torch.float64)
    target = torch.full((len(rows), width + 1, VOCAB), 1.0 / VOCAB, dtype=torch.float64)
    for r, (ctx, (toks, pars, probs, paths)) in enumerate(built):
        n = len(toks)
        tokens[r, :n], parents[r, :n] = torch.tensor(toks), torch.tensor(pars)
        if n:
            draft_probs[r, :n] = torch.stack(probs)
        target[r, 0] = TARGET(ctx)
        for j, path in enumerate(paths):
            target[r, j + 1] = TARGET(ctx + path)
    return target, DraftProposal(tokens, parents, draft_probs if with_probs else None)


def _joint_counts(verifier, rows, with_probs, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = np.zeros((len(rows), VOCAB ** LENGTH))
    for _ in range(DRAWS):
        target, proposal = _step(rows, gen, with_probs)
        res = verifier(target, proposal, [gen] * len(rows))
        for r, (ctx, _, _) in enumerate(rows):
            out = res.tokens[r, :int(res.num_accepted[r]) + 1].tolist()[:LENGTH]
            while len(out) < LENGTH:  # later tokens: plain exact sampling from the target
                out.append(int(torch.multinomial(TARGET(ctx + tuple(out)), 1, generator=gen)))
            counts[r, int(np.ravel_multi_index(out, (VOCAB,) * LENGTH))] += 1
    return counts


def _expected(rows):
    exp = np.zeros((len(rows), VOCAB ** LENGTH))
    for r, (ctx, _, _) in enumerate(rows):
        for i, seq in enumerate(itertools.product(range(VOCAB), repeat=LENGTH)):
            exp[r, i] = np.prod([float(TARGET(ctx + seq[:k])[seq[k]]) for k in range(LENGTH)])
    return exp * DRAWS


def power(stat, df):
    """Power of the test at ALPHA against a verifier whose noncentrality is estimated by
    stat - df (the unbiased estimate from its own draws)."""
    return float(ncx2.sf(chi2.isf(ALPHA, df), df, max(stat - df, 1e-9)))


@pytest.mark.parametrize("rows,with_probs", [(BATCH_WITH_PROBS, True),
                                             (BATCH_POINT_MASSES, False)],
                         ids=["sampled_trees_and_chains", "point_mass_trees_and_chains"])
def test_joint_law_of_three_tokens_matches_the_target(rows, with_probs):
    counts = _joint_counts(verify_sampled_tree, rows, with_probs, seed=11)
    stat, df, p_value = chi_square(zip(counts, _expected(rows)))
    assert p_value > ALPHA, f"chi2={stat:.1f} df={df} p={p_value:.2e}"


# ---- deliberately broken verifiers: the same walk as verify.py with one bug each ----------------

def broken_verifier(bug: str):
    def verifier(target_probs, proposal, gens):
        batch, width = proposal.tokens.shape
        out = torch.full((batch, width + 1), PAD, dtype=torch.long)
        num_accepted = torch.zeros(batch, dtype=torch.long)
        for r in range(batch):
            toks, pars = proposal.tokens[r].tolist(), proposal.parents[r].tolist()
            kids: dict[int, list[int]] = {}
            for j, (t, par) in enumerate(zip(toks, pars)):
                if t != PAD:
                    kids.setdefault(par, []).append(j)
            node, emitted, depth, gen = -1, [], 1, gens[r]
            while True:
                siblings = kids.get(pars[node], []) if node >= 0 else []
                judge = node
                if bug == "sibling_distribution" and len(siblings) > 1:
                    judge = siblings[(siblings.index(node) + 1) % len(siblings)]
                p = target_probs[r, judge + 1].clone()
                accepted = None
                for child in kids.get(node, []):
                    x = toks[child]
                    q = (None if proposal.draft_probs is None
                         else proposal.draft_probs[r, child].double())
                    qx = 1.0 if q is None else float(q[x])
                    u = float(torch.rand((), generator=gen, dtype=torch.float64))
                    if bug == "always_accept":
                        ok = True
                    elif bug == "accept_with_p":
                        ok = u < float(p[x])
                    else:
                        ok = qx > 0 and u * qx < float(p[x])
                    if ok:
                        accepted = child
                        break
                    if bug == "resample_from_p" or (bug == "skip_residual_depth_2" and depth == 2):
                        continue
                    p = p.clone()
                    if q is None:
                        p[x] = 0.0
                    else:
                        p = torch.clamp(p - q, min=0.0)
                    p = p / p.sum() if float(p.sum()) > 0 else target_probs[r, judge + 1].clone()
                if accepted is None:
                    emitted.append(int(torch.multinomial(p, 1, generator=gen)))
                    break
                emitted.append(toks[accepted])
                node, depth = accepted, depth + 1
            out[r, :len(emitted)] = torch.tensor(emitted)
            num_accepted[r] = len(emitted) - 1
        return VerifyResult(out, num_accepted, torch.full((batch, width), PAD, dtype=torch.long))
    return verifier


MUTANTS = ["always_accept", "resample_from_p", "accept_with_p", "skip_residual_depth_2",
           "sibling_distribution"]


@pytest.mark.parametrize("bug", MUTANTS)
def test_broken_verifiers_are_rejected(bug, summary_line):
    rows, with_probs = BATCH_WITH_PROBS, True
    counts = _joint_counts(broken_verifier(bug), rows, with_probs, seed=11)
    stat, df, p_value = chi_square(zip(counts, _expected(rows)))
    summary_line(f"broken verifier {bug!r}: chi2={stat:.1f} df={df} p={p_value:.1e} -> "
                 f"{'rejected' if p_value < ALPHA else 'NOT rejected'} at {ALPHA} "
                 f"(power at its noncentrality {power(stat, df):.4f}, {DRAWS} draws)")
    assert p_value < ALPHA, f"the test cannot see {bug}: chi2={stat:.1f} df={df} p={p_value:.2e}"
    assert power(stat, df) >= 0.99


def test_the_reference_walk_without_a_bug_passes():
    """The mutants differ from a correct walk by their bug alone."""
    counts = _joint_counts(broken_verifier("none"), BATCH_WITH_PROBS, True, seed=12)
    assert chi_square(zip(counts, _expected(BATCH_WITH_PROBS)))[2] > ALPHA
