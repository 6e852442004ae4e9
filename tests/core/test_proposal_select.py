"""DraftProposal.select / keep_best: cutting a tree keeps it a tree, moves the kept nodes to
the front of their row and narrows the block to the longest row (what the verify pass pays for)."""
from __future__ import annotations

import torch

from specplug.types import PAD, DraftProposal


def _tree() -> DraftProposal:
    # row 0:      a(0.9) -> b(0.6) -> c(0.2)        row 1: x(0.5), y(0.4) -> z(0.3)
    #             a      -> d(0.25)
    tokens = torch.tensor([[11, 12, 13, 14], [21, 22, 23, PAD]])
    parents = torch.tensor([[-1, 0, 1, 0], [-1, -1, 1, -1]])
    scores = torch.tensor([[0.9, 0.6, 0.2, 0.25], [0.5, 0.4, 0.3, 0.0]])
    return DraftProposal(tokens, parents, scores=scores)


def _paths(p: DraftProposal) -> list[set[tuple[int, ...]]]:
    """Per row, the token path from the root to every node (what verification sees)."""
    out = []
    for toks, pars in zip(p.tokens.tolist(), p.parents.tolist()):
        paths = set()
        for j, t in enumerate(toks):
            if t == PAD:
                continue
            path, k = [], j
            while k >= 0:
                path.append(toks[k])
                k = pars[k]
            paths.add(tuple(reversed(path)))
        out.append(paths)
    return out


def test_keep_best_keeps_the_likeliest_nodes_as_a_tree():
    cut = _tree().keep_best(torch.tensor([3, 1]))
    assert _paths(cut) == [{(11,), (11, 12), (11, 14)}, {(21,)}]
    assert cut.tokens.shape[1] == 3  # narrowed to the longest row
    assert cut.scores.tolist()[1] == [0.5, 0.0, 0.0]


def test_select_moves_kept_nodes_to_the_front_and_remaps_parents():
    p = _tree()
    keep = torch.tensor([[True, False, False, True], [False, True, True, False]])
    cut = p.select(keep)
    assert cut.tokens.tolist() == [[11, 14], [22, 23]]
    assert cut.parents.tolist() == [[-1, 0], [-1, 0]]
    assert _paths(cut) == [{(11,), (11, 14)}, {(22,), (22, 23)}]


def test_select_of_nothing_is_an_empty_block():
    cut = _tree().select(torch.zeros(2, 4, dtype=torch.bool))
    assert cut.tokens.shape == (2, 0) and cut.num_nodes.tolist() == [0, 0]


def test_select_carries_draft_probs_along():
    p = _tree()
    p.draft_probs = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    cut = p.select(torch.tensor([[True, False, False, True], [True, False, False, False]]))
    assert torch.equal(cut.draft_probs[0, 1], p.draft_probs[0, 3])
    assert torch.equal(cut.draft_probs[1, 0], p.draft_probs[1, 0])
