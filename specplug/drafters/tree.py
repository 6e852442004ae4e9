"""EAGLE-2 dynamic draft trees, usable by any drafter that can score children of a set of nodes.

Expansion (Li et al., EAGLE-2): the root's top-k children form depth 1 and are all expanded; at
every later depth each expanded node proposes its top-k children, scored by the cumulative draft
log-prob of their path, and the k best of those k*k are expanded next.  Every candidate ever
scored stays in the pool; the `nodes` best of the pool become the tree.  Cumulative log-probs
never grow along a path, so the best `nodes` form a connected tree (ties: a parent precedes its
children in pool order and the sort is stable).

Worked example, k = 2, depth 2, nodes 3, root "the":
  depth 1: cat (-0.1), dog (-2.5)                       both expanded
  depth 2: cat->sat (-0.3), cat->ran (-2.0), dog->sat (-2.6), dog->ran (-4.0)
  best 3 by score: cat, sat (under cat), ran (under cat)
  -> tokens [cat, sat, ran], parents [-1, 0, 0]

The nodes come out deterministic (top-k, not sampled), so proposals carry draft_probs=None and
verification treats them as point masses, which is lossless at any temperature (see verify.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..types import PAD, ROOT, DraftProposal


@dataclass(frozen=True)
class TreeSettings:
    topk: int  # children scored per expanded node, and nodes expanded per depth
    depth: int | None = None  # None: the engine's num_draft_tokens
    nodes: int | None = None  # draft nodes kept (root excluded); None: topk * depth

    @staticmethod
    def from_options(options: dict) -> "TreeSettings | None":
        """DrafterSpec.options keys tree_topk / tree_depth / tree_nodes; None when no tree."""
        names = ("tree_topk", "tree_depth", "tree_nodes")
        given = {k: options[k] for k in names if options.get(k) is not None}
        if not given:
            return None
        bad = [k for k, v in given.items() if int(v) < 1]
        if bad:
            raise ValueError(f"tree option {bad[0]}={given[bad[0]]} must be >= 1")
        return TreeSettings(topk=int(given.get("tree_topk", 4)),
                            depth=int(given["tree_depth"]) if "tree_depth" in given else None,
                            nodes=int(given["tree_nodes"]) if "tree_nodes" in given else None)

    def resolve(self, num_draft_tokens: int) -> tuple[int, int, int]:
        depth = self.depth or num_draft_tokens
        return self.topk, depth, self.nodes or self.topk * depth


# expand(tokens [b, k], parent [b, k]) -> child log-probs [b, k, vocab].  `parent` indexes the
# nodes fed by the previous call (ROOT on the first call); the caller runs its model on the
# new nodes and keeps whatever state it needs to expand them again.
Expander = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expand_tree(root_logprobs: torch.Tensor, expand: Expander, topk: int, depth: int,
                num_nodes: int) -> DraftProposal:
    """root_logprobs [b, vocab] (target vocabulary; -inf where the drafter cannot go)."""
    b, vocab = root_logprobs.shape
    k = min(topk, vocab)
    scores, tokens = root_logprobs.double().topk(k, dim=-1)  # [b, k]
    pool_tokens, pool_scores = [tokens], [scores]
    dev = root_logprobs.device
    pool_parents = [torch.full((b, k), ROOT, dtype=torch.long, device=dev)]
    fed_index = torch.arange(k, device=dev).expand(b, k)  # pool index of each node being expanded
    fed_tokens, fed_scores = tokens, scores
    fed_parent = torch.full((b, k), ROOT, dtype=torch.long, device=dev)
    pool_size = k
    for _ in range(depth - 1):
        logprobs = expand(fed_tokens, fed_parent).double()  # [b, k, vocab]
        child_scores, child_tokens = logprobs.topk(k, dim=-1)  # [b, k, k]
        cum = (fed_scores[:, :, None] + child_scores).flatten(1)  # [b, k*k]
        child_tokens = child_tokens.flatten(1)
        pool_tokens.append(child_tokens)
        pool_scores.append(cum)
        pool_parents.append(fed_index[:, :, None].expand(b, k, k).flatten(1))
        best = cum.topk(k, dim=-1).indices  # [b, k] children to expand next
        fed_parent = best // k
        fed_tokens = child_tokens.gather(1, best)
        fed_scores = cum.gather(1, best)
        fed_index = pool_size + best
        pool_size += k * k
    return select_tree(torch.cat(pool_tokens, 1), torch.cat(pool_parents, 1),
                       torch.cat(pool_scores, 1), num_nodes)


def select_tree(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor,
                num_nodes: int) -> DraftProposal:
    """Keep the num_nodes best pool nodes per row as a tree.

    tokens, parents, scores [b, pool]: pool order puts every parent before its children, and a
    child's score (a log path probability) never exceeds its parent's.  Nodes with score -inf
    are never kept.  The proposal's scores are the kept nodes' path probabilities.
    """
    b, pool = tokens.shape
    n = min(num_nodes, pool)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    keep_scores = scores.gather(1, order)
    chosen = torch.sort(order, dim=1).indices  # back to pool order: parents first
    order = order.gather(1, chosen)
    finite = torch.isfinite(keep_scores.gather(1, chosen))
    # new index of each kept pool node, to renumber parents
    new_index = torch.full((b, pool), PAD, dtype=torch.long, device=tokens.device)
    new_index.scatter_(1, order, torch.arange(n, device=tokens.device).expand(b, n).clone())
    old_parent = parents.gather(1, order)
    new_parent = torch.where(old_parent == ROOT, ROOT,
                             new_index.gather(1, old_parent.clamp(min=0)))
    out_tokens = torch.where(finite, tokens.gather(1, order), PAD)
    # a parent dropped as -inf takes its children with it
    for j in range(n):
        par = new_parent[:, j]
        dead_parent = (par >= 0) & (out_tokens.gather(1, par.clamp(min=0)[:, None])[:, 0] == PAD)
        out_tokens[:, j] = torch.where(dead_parent, PAD, out_tokens[:, j])
    new_parent = torch.where(out_tokens == PAD, ROOT, new_parent)
    # each kept node's path probability under the drafter (its confidence, for the budget)
    path_prob = torch.where(out_tokens == PAD, 0.0, keep_scores.gather(1, chosen).exp())
    return DraftProposal(out_tokens, new_parent, scores=path_prob.float())
