"""Rejection sampling keeps the target's distribution: chi-square on >= 10k verify steps with
synthetic p and q, for sampled and deterministic drafts, chains and trees."""
import numpy as np
import pytest
import torch
from sampling_checks import chi_square

from specplug.sampling import probs_from_logits
from specplug.types import DraftProposal, SamplingParams
from specplug.verify import verify_sampled_tree

VOCAB = 6
DRAWS = 12000


def _dist(seed, sharp=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64) * sharp, -1)


def _check(counts, expected_probs):
    counts = np.asarray(counts, float)
    stat, df, p_value = chi_square([(counts, np.asarray(expected_probs) * counts.sum())])
    assert p_value > 0.01, f"differs from the target (chi2={stat:.1f} df={df} p={p_value:.2e})"


def _first_token_counts(p_root, p_child, make_proposal, draws=DRAWS, seed=0):
    """Run verify `draws` times on one row; count the first output token."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.stack([p_root, p_child, p_child, p_child])[None]  # [1, 4, vocab]
    counts = np.zeros(VOCAB)
    for _ in range(draws):
        prop = make_proposal(gen)
        res = verify_sampled_tree(target[:, :prop.tokens.shape[1] + 1], prop, [gen])
        counts[int(res.tokens[0, 0])] += 1
    return counts


@pytest.mark.parametrize("kind", ["sampled_chain", "deterministic_chain", "iid_tree", "topk_tree"])
def test_first_token_matches_target(kind):
    p, q, p2 = _dist(1), _dist(2), _dist(3)

    def make(gen):
        if kind == "sampled_chain":
            x = torch.multinomial(q, 2, replacement=True, generator=gen)
            return DraftProposal.chain(x[None], torch.stack([q, q])[None])
        if kind == "deterministic_chain":
            return DraftProposal.chain(torch.tensor([[int(q.argmax()), 2]]))
        if kind == "iid_tree":  # three siblings drawn i.i.d. from q
            x = torch.multinomial(q, 3, replacement=True, generator=gen)
            return DraftProposal(x[None], torch.tensor([[-1, -1, -1]]), torch.stack([q, q, q])[None])
        top = torch.topk(q, 3).indices  # three deterministic siblings (EAGLE-2 style top-k)
        return DraftProposal(top[None], torch.tensor([[-1, -1, -1]]))

    counts = _first_token_counts(p, p2, make)
    _check(counts, p.numpy())


def test_second_token_conditional_matches_target():
    """Two-level chain with sampled drafts: P(t1, t2) must equal p(t1) * p(t2 | t1)."""
    gen = torch.Generator().manual_seed(5)
    p_root, p_next, q = _dist(11), _dist(12), _dist(13)
    target = torch.stack([p_root, p_next, p_next])[None]
    joint = np.zeros((VOCAB, VOCAB))
    for _ in range(DRAWS):
        x = torch.multinomial(q, 2, replacement=True, generator=gen)
        res = verify_sampled_tree(target, DraftProposal.chain(x[None], torch.stack([q, q])[None]), [gen])
        if int(res.num_accepted[0]) >= 1:  # t2 is only produced in this step when t1 was accepted
            joint[int(res.tokens[0, 0]), int(res.tokens[0, 1])] += 1
    # given t1 accepted, t2 ~ p_next whatever t1 was
    _check(joint.sum(0), p_next.numpy())


def test_temperature_top_k_top_p_applied_to_both():
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    p = probs_from_logits(logits, params)
    assert abs(float(p.sum()) - 1) < 1e-12
    assert int((p > 0).sum()) <= 4
    q = probs_from_logits(logits + 0.3 * torch.randn(VOCAB, dtype=torch.float64), params)
    gen = torch.Generator().manual_seed(0)
    target = torch.stack([p, p])[None]
    counts = np.zeros(VOCAB)
    for _ in range(DRAWS):
        x = torch.multinomial(q, 1, generator=gen)
        res = verify_sampled_tree(target, DraftProposal.chain(x[None], q[None, None]), [gen])
        counts[int(res.tokens[0, 0])] += 1
    assert counts[p.numpy() == 0].sum() == 0  # never a token the target's filters removed
    _check(counts, p.numpy())
