"""The suffix index against brute force on random token streams, and the suffix drafter."""
from __future__ import annotations

import random

import pytest
import torch

from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.suffix import SuffixDrafter, SuffixOptions
from specplug.drafters.suffix_index import StreamCursor, SuffixIndex, best_continuations
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.types import DraftInput


def brute_counts(streams, depth):
    """Occurrences of every string of length 1..depth in the streams."""
    out = {}
    for s in streams:
        for i in range(len(s)):
            for m in range(1, depth + 1):
                if i + m <= len(s):
                    key = tuple(s[i:i + m])
                    out[key] = out.get(key, 0) + 1
    return out


def index_counts(index):
    out, stack = {}, [((), index.root)]
    while stack:
        path, node = stack.pop()
        for tok, child in node.children.items():
            out[path + (tok,)] = child.count
            stack.append((path + (tok,), child))
    return out


def random_streams(rng, n, vocab=3, longest=40):
    return [[rng.randrange(vocab) for _ in range(rng.randrange(0, longest))] for _ in range(n)]


def build_index(streams, depth, rng):
    """Index each stream in random chunks, as a drafter would step by step."""
    index = SuffixIndex(depth)
    for s in streams:
        cursor, i = StreamCursor(), 0
        while i < len(s):
            k = rng.randrange(1, 6)
            index.append(cursor, s[i:i + k])
            i += k
        assert cursor.length == len(s)
    return index


@pytest.mark.parametrize("seed", range(40))
def test_counts_equal_brute_force_and_removal_undoes_append(seed):
    rng = random.Random(seed)
    depth = rng.choice([2, 3, 5, 8])
    streams = random_streams(rng, rng.randrange(1, 5))
    index = build_index(streams, depth, rng)
    assert index_counts(index) == brute_counts(streams, depth)
    gone = rng.randrange(len(streams))
    index.remove(streams[gone])
    rest = streams[:gone] + streams[gone + 1:]
    assert index_counts(index) == brute_counts(rest, depth)  # zero-count nodes are cut too
    for s in rest:
        index.remove(s)
    assert index.root.children == {}


def brute_longest_match(streams, context, max_len, depth):
    for m in range(min(max_len, depth - 1, len(context)), 0, -1):
        suffix = context[len(context) - m:]
        if any(s[i:i + m] == suffix and i + m < len(s) for s in streams for i in range(len(s))):
            return m
    return 0


@pytest.mark.parametrize("seed", range(40))
def test_longest_match_and_continuation_odds_equal_brute_force(seed):
    rng = random.Random(100 + seed)
    depth = rng.choice([3, 5, 8])
    streams = random_streams(rng, 3, vocab=rng.choice([2, 3, 5]))
    index = build_index(streams, depth, rng)
    context = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
    node, m = index.longest_match(context, max_len=6)
    assert m == brute_longest_match(streams, context, 6, depth)
    if not m:
        assert node is None
        return
    # each continuation's odds: how often it followed the suffix, among continued occurrences
    suffix = context[len(context) - m:]
    follows = [s[i + m] for s in streams for i in range(len(s))
               if s[i:i + m] == suffix and i + m < len(s)]
    picked = best_continuations(node, max_nodes=50, max_depth=1, min_prob=0.0)
    assert {t: p for t, _, p in picked} == pytest.approx(
        {t: follows.count(t) / len(follows) for t in set(follows)})


def test_continuation_tree_is_best_first_pruned_and_bounded():
    rng = random.Random(7)
    index = build_index(random_streams(rng, 4, vocab=3, longest=80), 8, rng)
    node, _ = index.longest_match([0, 1], 2)
    full = best_continuations(node, max_nodes=1000, max_depth=4, min_prob=0.0)
    probs = [p for _, _, p in full]
    assert probs == sorted(probs, reverse=True)  # likeliest first
    assert all(parent < i for i, (_, parent, _) in enumerate(full))  # parents come first
    # a child's path probability is at most its parent's, and siblings' shares sum to 1
    for i, (_, parent, p) in enumerate(full):
        if parent >= 0:
            assert p <= full[parent][2] + 1e-12
    top = [p for _, parent, p in full if parent == -1]
    assert sum(top) == pytest.approx(1.0)
    pruned = best_continuations(node, max_nodes=1000, max_depth=4, min_prob=0.2)
    assert pruned == [x for x in full if x[2] >= 0.2]
    assert best_continuations(node, max_nodes=3, max_depth=4, min_prob=0.0) == full[:3]


def _input(rows, gamma=4):
    return DraftInput(row_ids=list(range(len(rows))),
                      token_ids=[torch.tensor(r, dtype=torch.long) for r in rows],
                      num_draft_tokens=gamma)


def test_drafter_proposes_what_followed_and_indexes_only_new_tokens():
    drafter = SuffixDrafter(SuffixOptions(min_prob=0.0, spec_factor=1.0))
    prompt = [5, 6, 7, 8, 9, 1, 2, 5, 6]
    proposal = drafter.propose(_input([prompt]))
    assert proposal.tokens[0].tolist() == [7, 8]  # match "5 6" (length 2): at most 2 tokens
    # the default spec_factor (2) proposes up to twice the match length
    doubled = SuffixDrafter(SuffixOptions(min_prob=0.0)).propose(_input([prompt], gamma=8))
    assert doubled.tokens[0].tolist() == [7, 8, 9, 1]
    row = drafter.rows[0]
    assert row.cursor.length == len(prompt)
    drafter.propose(_input([prompt + [7, 8]]))
    assert drafter.rows[0] is row and row.cursor.length == len(prompt) + 2
    # the match is now "5 6 7 8" (length 4): the whole remembered continuation
    assert drafter.propose(_input([prompt + [7, 8]])).tokens[0].tolist() == [9, 1, 2, 5]
    # a row id reused by another request starts a new index
    drafter.propose(_input([[3, 3, 4]]))
    assert drafter.rows[0] is not row and drafter.rows[0].cursor.length == 3


def test_finished_outputs_serve_later_requests_and_leave_the_lru():
    drafter = SuffixDrafter(SuffixOptions(min_prob=0.0, global_requests=1))
    first = [1, 2, 3] + [10, 11, 12, 13, 14]  # prompt [1, 2, 3], output 10..14
    drafter.propose(_input([first[:4]]))  # first sight: prompt + the prefill token
    drafter.propose(_input([first]))
    drafter.release([0])
    assert drafter.propose(_input([[7, 7, 10, 11, 12]])).tokens[0].tolist() == [13, 14]
    drafter.release([0])  # a 5-token request whose output (1 token) is too short to keep
    second = [9, 9, 20, 21, 22, 23]
    drafter.propose(_input([second[:3]]))
    drafter.propose(_input([second]))
    drafter.release([0])  # evicts the first request's output (room for one)
    assert drafter.propose(_input([[7, 7, 10, 11, 12]])).tokens.shape[1] == 0
    assert drafter.propose(_input([[8, 20, 21]])).tokens[0].tolist() == [22, 23]


def test_tree_mode_proposes_a_tree_and_bad_options_are_one_line():
    drafter = SuffixDrafter(SuffixOptions(min_prob=0.0, tree_nodes=6))
    ctx = [5, 1, 2, 3, 5, 1, 2, 4, 5, 1, 2]  # "5 1 2" went on with 3 once and 4 once
    proposal = drafter.propose(_input([ctx]))
    assert not proposal.is_chain()
    assert sorted(proposal.tokens[0][proposal.parents[0] == -1].tolist()) == [3, 4]
    with pytest.raises(ValueError, match="unknown options"):
        build_drafter(DrafterSpec("suffix", None, {"depth": 3}), None)
    with pytest.raises(ValueError, match="min_prob"):
        build_drafter(DrafterSpec("suffix", None, {"min_prob": 2}), None)


@pytest.mark.parametrize("tree_nodes", [0, 8])
def test_greedy_output_identical_to_plain(tree_nodes):
    from specplug.models.tiny import build_tiny_llama
    model = build_tiny_llama(0)
    base = [10, 20, 30, 40, 10, 20, 30, 40, 50]
    reqs = [Request(base, 24), Request([7, 8, 9, 7, 8], 24), Request(base[:5], 24)]
    plain, _ = EmbeddedEngine(model, None, None).generate(reqs, batch_size=3)
    from specplug.models.loading import target_info
    drafter = build_drafter(DrafterSpec("suffix", None, {"tree_nodes": tree_nodes}),
                            target_info(model))
    spec, stats = EmbeddedEngine(model, None, drafter, 4).generate(reqs, batch_size=2)
    assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0, stats.summary()
