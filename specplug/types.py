"""The few types every part of specplug speaks.

Vocabulary (used the same way in every module):
  committed tokens  the prompt plus every output token so far, per row.
  draft tokens      what a drafter proposes after the last committed token: a chain or a tree.
  accepted tokens   draft tokens the target agreed with (greedy) or kept (rejection sampling).
  recovered token   sampled from the residual max(0, p - q) where a draft token was rejected.
  bonus token       sampled from the target when every draft token on the path was accepted.
  accept length     accepted drafts + 1 (the recovered or bonus token), per verify step; its
                    mean over steps is tau, as vLLM and SGLang count it.

A chain is a tree whose node j has parent j - 1.  Node parents index into the same row's nodes;
-1 is the root, i.e. the last committed token.  Worked example, gamma = 3 chain after "the":
  tokens  = [[cat, sat, on]]      parents = [[-1, 0, 1]]
  target sees [the, cat, sat, on] and returns logits for 4 positions; position 0 judges "cat".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD = -1  # padding for ragged token tensors; a node is real iff its token != PAD
ROOT = -1  # parent index of the root's children (the root is the last committed token)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1.0 means off

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"bad sampling settings: temperature={self.temperature} top_k={self.top_k} "
                f"top_p={self.top_p} (need temperature >= 0, top_k >= 0, 0 < top_p <= 1)")


@dataclass
class DrafterNeeds:
    """What a drafter asks the engine to hand it besides token ids."""
    # Indices into HF's `hidden_states` tuple (0 = embeddings, i + 1 = output of layer i,
    # -1 = final normed hidden).  Empty: token-only drafter.
    hidden_layers: tuple[int, ...] = ()


@dataclass
class DraftInput:
    """One drafting step for a batch of rows (rows are requests; order may change per step)."""
    row_ids: list[int]  # stable request ids: a drafter keys its per-request state on them
    # per row [num_committed] integer ids, prompt + output so far.  On the CPU: committed tokens
    # are host bookkeeping in every engine (vLLM's token_ids_cpu, SGLang's request lists), and
    # token-only drafters search them there.  Everything else lives on the target's device.
    token_ids: list[torch.Tensor]
    num_draft_tokens: int  # gamma: chain length, or tree depth for tree drafters
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # per row: tokens committed since this row's previous propose() (its accept length, or the
    # sum of them when the row skipped drafting; the whole context on its first call).  With it
    # a drafter brings its state up to date from the last num_new tokens alone, O(new tokens)
    # per step; None (an engine that cannot say) makes drafters compare their state with the
    # whole context instead (row_slots.surviving_prefix, the one fallback).
    num_new_committed: list[int] | None = None
    # Target features for committed positions the drafter has not been given yet: row r gets
    # positions [hidden_start[r], num_committed[r] - 1) as [n_new, len(hidden_layers) * H].
    # The last committed token has no feature yet (the target has not run on it).
    hidden_states: list[torch.Tensor] | None = None
    hidden_start: list[int] | None = None
    generators: list[torch.Generator | None] | None = None  # per row, for sampled drafts


@dataclass
class DraftProposal:
    """Draft tokens for a batch, in the TARGET's vocabulary."""
    tokens: torch.Tensor  # [batch, num_nodes] int64, PAD where a row has fewer nodes
    parents: torch.Tensor  # [batch, num_nodes] int64, ROOT = last committed token; ignored on PAD
    # Distribution each node was drawn from (over the target vocab), [batch, num_nodes, vocab].
    # None: drafts are deterministic (argmax, top-k, lookup) and verified as point masses,
    # which is lossless too (see verify.py).
    draft_probs: torch.Tensor | None = None
    # [batch, num_nodes] float32: the drafter's estimate that each node is accepted (its path
    # probability: never above its parent's), 0 on PAD.  None: the drafter has no confidence.
    # The speculation budget keeps the best nodes by it.
    scores: torch.Tensor | None = None

    @staticmethod
    def chain(tokens: torch.Tensor, draft_probs: torch.Tensor | None = None,
              scores: torch.Tensor | None = None) -> "DraftProposal":
        """tokens [batch, gamma] padded with PAD at the end of short rows."""
        batch, n = tokens.shape
        parents = torch.arange(-1, n - 1, dtype=torch.long, device=tokens.device)
        parents = parents.expand(batch, n).clone()
        return DraftProposal(tokens.long(), parents, draft_probs, scores)

    @staticmethod
    def from_rows(rows: list[tuple[list[int], list[int]]],
                  device: torch.device | str | None = None,
                  scores: list[list[float]] | None = None) -> "DraftProposal":
        """rows: per row (tokens, parents) lists of any length -> padded proposal on `device`
        (None: torch's default device; a chain when every row is one).  scores: per row, each
        node's path probability.  Built on the host, copied over once."""
        width = max((len(t) for t, _ in rows), default=0)
        tokens = torch.full((len(rows), width), PAD, dtype=torch.long, device="cpu")
        parents = torch.full((len(rows), width), ROOT, dtype=torch.long, device="cpu")
        for r, (toks, pars) in enumerate(rows):
            tokens[r, :len(toks)] = torch.tensor(toks, dtype=torch.long, device="cpu")
            parents[r, :len(pars)] = torch.tensor(pars, dtype=torch.long, device="cpu")
        device = torch.get_default_device() if device is None else device
        tokens, parents = tokens.to(device), parents.to(device)
        node_scores = None
        if scores is not None:
            node_scores = torch.zeros((len(rows), width), dtype=torch.float32, device="cpu")
            for r, row_scores in enumerate(scores):
                node_scores[r, :len(row_scores)] = torch.tensor(row_scores, dtype=torch.float32,
                                                           device="cpu")
            node_scores = node_scores.to(device)
        if all(p == list(range(-1, len(p) - 1)) for _, p in rows):
            return DraftProposal.chain(tokens, scores=node_scores)
        return DraftProposal(tokens, parents, scores=node_scores)

    @staticmethod
    def empty(batch: int, device: torch.device | str | None = None) -> "DraftProposal":
        return DraftProposal.chain(torch.full((batch, 0), PAD, dtype=torch.long, device=device))

    @property
    def num_nodes(self) -> torch.Tensor:  # [batch]
        return (self.tokens != PAD).sum(dim=1)

    def is_chain(self) -> bool:
        n = self.tokens.shape[1]
        expect = torch.arange(-1, n - 1, device=self.parents.device).expand_as(self.parents)
        real = self.tokens != PAD
        # the engine needs to know on the host: chains and trees take different verify paths
        return bool(((self.parents == expect) | ~real).all())

    def select(self, keep: torch.Tensor) -> "DraftProposal":
        """The nodes where keep ([batch, num_nodes] bool; a kept node's parent is kept too),
        moved to the front of their row in their order, the width cut to the longest row."""
        keep = keep & (self.tokens != PAD)
        # stable: kept nodes first, each row's kept nodes in their old order (parents first)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        width = int(keep.sum(dim=1).max()) if keep.numel() else 0  # a shape: the host decides
        new_index = torch.empty_like(order)
        new_index.scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                           .expand_as(order).contiguous())
        order = order[:, :width]
        kept = keep.gather(1, order)
        tokens = self.tokens.gather(1, order).masked_fill(~kept, PAD)
        old_parents = self.parents.gather(1, order)
        parents = torch.where(old_parents >= 0, new_index.gather(1, old_parents.clamp(min=0)),
                              ROOT)
        probs = scores = None
        if self.draft_probs is not None:
            probs = self.draft_probs.gather(
                1, order[..., None].expand(-1, -1, self.draft_probs.shape[-1]))
        if self.scores is not None:
            scores = self.scores.gather(1, order).masked_fill(~kept, 0.0)
        return DraftProposal(tokens, parents, probs, scores)

    def keep_best(self, counts: torch.Tensor) -> "DraftProposal":
        """Each row's counts[r] ([batch]) best-scored nodes (ties: the earlier node), so a kept
        node's parent, scored at least as high and earlier, is kept too."""
        n = self.tokens.shape[1]
        # rank within the row by (score descending, index ascending)
        key = self.scores.masked_fill(self.tokens == PAD, -1.0).double()
        key = key - torch.arange(n, device=key.device, dtype=torch.float64) * 1e-9
        rank = torch.argsort(torch.argsort(key, dim=1, descending=True), dim=1)
        return self.select(rank < counts[:, None])

    def depths(self) -> torch.Tensor:
        """[batch, num_nodes] depth of each node (root's children have depth 1), 0 on PAD."""
        depth = torch.zeros_like(self.parents)
        for j in range(self.parents.shape[1]):  # parents always precede children
            par = self.parents[:, j]
            parent_depth = torch.where(par >= 0, depth.gather(1, par.clamp(min=0)[:, None])[:, 0], 0)
            depth[:, j] = torch.where(self.tokens[:, j] == PAD, 0, parent_depth + 1)
        return depth


@dataclass
class VerifyResult:
    """Outcome of one verify step."""
    # [batch, num_nodes + 1] accepted draft tokens then the recovered/bonus token, PAD after.
    tokens: torch.Tensor
    num_accepted: torch.Tensor  # [batch] draft tokens accepted; accept length = this + 1
    # [batch, num_nodes] node indices on the accepted path, in order, PAD after.
    accepted_nodes: torch.Tensor

    def row_tokens(self, row: int) -> list[int]:
        n = int(self.num_accepted[row]) + 1
        return self.tokens[row, :n].tolist()
