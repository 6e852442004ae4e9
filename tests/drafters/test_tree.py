"""EAGLE-2 dynamic trees: literal selection tables, expansion with a scripted expander, and in
the engine: same greedy output as chain verification, higher tau than a chain of equal depth."""
import math

import pytest
import torch

from eagle_fixtures import attention_only_target, bos_prompts, eagle3_state, run, save_head
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.tree import TreeSettings, expand_tree, select_tree
from specplug.models.loading import target_info
from specplug.types import PAD, ROOT

L = math.log


def test_select_tree_keeps_best_connected_nodes():
    # pool: depth 1 [cat, dog], depth 2 [cat>sat, cat>ran, dog>sat, dog>ran]
    tokens = torch.tensor([[10, 11, 20, 21, 22, 23]])
    parents = torch.tensor([[ROOT, ROOT, 0, 0, 1, 1]])
    scores = torch.tensor([[-0.1, -2.5, -0.3, -2.0, -2.6, -4.0]])
    tree = select_tree(tokens, parents, scores, 3)
    assert tree.tokens.tolist() == [[10, 20, 21]]
    assert tree.parents.tolist() == [[ROOT, 0, 0]]


def test_select_tree_ties_keep_parents_and_drops_minus_inf():
    tokens = torch.tensor([[1, 2, 3, 4]])
    parents = torch.tensor([[ROOT, ROOT, 0, 1]])
    scores = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]])  # child ties its parent
    tree = select_tree(tokens, parents, scores, 4)
    assert tree.tokens.tolist() == [[1, PAD, 3, PAD]]  # pool order kept; PAD nodes are ignored
    assert tree.scores.tolist() == [[1.0, 0.0, 1.0, 0.0]]  # exp(log path probability), 0 on PAD
    assert tree.parents[0, 2].item() == 0
    assert tree.num_nodes.tolist() == [2]


def test_expand_tree_with_scripted_children():
    vocab = 6
    root = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0, 0, 0]]).double())
    children = {0: [0.0, 0.0, 0.0, 0.9, 0.1, 0.0], 1: [0.0, 0.0, 0.0, 0.2, 0.0, 0.8]}
    calls = []

    def expand(tokens, parent):
        calls.append((tokens.tolist(), parent.tolist()))
        probs = torch.tensor([[children.get(t, [1 / vocab] * vocab) for t in tokens[0].tolist()]])
        return torch.log(probs.double())

    tree = expand_tree(root, expand, topk=2, depth=2, num_nodes=3)
    assert calls == [([[0, 1]], [[ROOT, ROOT]])]  # both root children expanded, once
    # pool: 0 (.6), 1 (.3), 0>3 (.54), 0>4 (.06), 1>5 (.24), 1>3 (.06): best 3 = 0, 1, 0>3
    assert tree.tokens.tolist() == [[0, 1, 3]]
    assert tree.parents.tolist() == [[ROOT, ROOT, 0]]
    # each node's path probability: the budget's confidence in it
    assert tree.scores[0].tolist() == pytest.approx([0.6, 0.3, 0.54])
    assert tree.draft_probs is None  # deterministic nodes: verified as point masses


def test_tree_settings():
    assert TreeSettings.from_options({}) is None
    s = TreeSettings.from_options({"tree_topk": 3, "tree_nodes": 9})
    assert s.resolve(5) == (3, 5, 9)
    assert TreeSettings.from_options({"tree_depth": 2}).resolve(5) == (4, 2, 8)
    with pytest.raises(ValueError, match="tree_topk"):
        TreeSettings.from_options({"tree_topk": 0})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    target = attention_only_target(0)
    folder = str(tmp_path_factory.mktemp("tree") / "h")
    save_head(folder, *eagle3_state(target, [0, 1, 1], noise=0.05))
    return target, folder, bos_prompts(20, seed=2)


def test_tree_matches_chain_output_and_beats_its_tau(setup, capsys):
    target, folder, prompts = setup
    depth = 4
    plain = run(target, None, prompts, 1)[0]
    results = {}
    for name, opts in [("chain", {}), ("tree k3 n16", {"tree_topk": 3, "tree_nodes": 16}),
                       ("tree k4 n40", {"tree_topk": 4, "tree_nodes": 40})]:
        drafter = build_drafter(DrafterSpec("eagle3", folder, opts), target_info(target))
        outs, stats = run(target, drafter, prompts, 4, depth)
        assert outs == plain
        results[name] = stats.mean_accept_length
    with capsys.disabled():
        print(f"\n[tree vs chain, depth {depth}, 20 prompts] " +
              ", ".join(f"{k}: tau {v:.3f}" for k, v in results.items()))
    assert results["tree k3 n16"] > results["chain"]
    assert results["tree k4 n40"] > results["chain"]
