"""Literal cases for greedy verification of chains and trees."""
import torch

from specplug.types import PAD, DraftProposal, SamplingParams
from specplug.verify import verify, verify_greedy_chain, verify_greedy_tree


def logits_for(argmaxes, vocab=10):
    """[batch][positions] argmax tokens -> logits with those argmaxes."""
    t = torch.tensor(argmaxes)
    return torch.nn.functional.one_hot(t, vocab).double() * 5.0


def test_chain_all_accepted_takes_bonus():
    prop = DraftProposal.chain(torch.tensor([[3, 4, 5]]))
    res = verify_greedy_chain(logits_for([[3, 4, 5, 6]]), prop)
    assert res.num_accepted.tolist() == [3]
    assert res.row_tokens(0) == [3, 4, 5, 6]
    assert res.accepted_nodes.tolist() == [[0, 1, 2]]


def test_chain_first_mismatch_recovers_target_token():
    prop = DraftProposal.chain(torch.tensor([[3, 9, 5]]))
    res = verify_greedy_chain(logits_for([[3, 4, 5, 6]]), prop)
    assert res.num_accepted.tolist() == [1]
    assert res.row_tokens(0) == [3, 4]
    assert res.tokens[0].tolist() == [3, 4, PAD, PAD]


def test_chain_ragged_rows_with_padding():
    prop = DraftProposal.chain(torch.tensor([[1, 2, PAD], [7, 7, 7], [PAD, PAD, PAD]]))
    res = verify_greedy_chain(logits_for([[1, 2, 8, 0], [7, 1, 1, 1], [4, 4, 4, 4]]), prop)
    assert res.num_accepted.tolist() == [2, 1, 0]
    assert [res.row_tokens(r) for r in range(3)] == [[1, 2, 8], [7, 1], [4]]


def test_tree_follows_the_matching_branch():
    # root children: node0 'a'=1, node1 'b'=2; node2 child of node1 'c'=3; node3 child of node0 'd'=4
    prop = DraftProposal(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[-1, -1, 1, 0]]))
    # target argmax: at root -> 2 (picks node1), at node1 (index 2) -> 3 (node2), at node2 -> 9
    argmax = [[2, 0, 3, 9, 0]]
    res = verify_greedy_tree(logits_for(argmax), prop)
    assert res.row_tokens(0) == [2, 3, 9]
    assert res.accepted_nodes[0, :2].tolist() == [1, 2]


def test_tree_verify_equals_chain_verify_on_chains():
    torch.manual_seed(0)
    for _ in range(50):
        toks = torch.randint(0, 5, (3, 4))
        logits = torch.randn(3, 5, 5)
        prop = DraftProposal.chain(toks)
        a, b = verify_greedy_chain(logits, prop), verify_greedy_tree(logits, prop)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)


def test_empty_proposal_is_plain_decoding():
    res = verify(logits_for([[6], [2]]), DraftProposal.empty(2), SamplingParams())
    assert [res.row_tokens(0), res.row_tokens(1)] == [[6], [2]]
