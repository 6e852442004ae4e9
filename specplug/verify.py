"""Verification of draft chains and trees against the target: greedy and lossless sampling.

Inputs for a batch of rows (see types.py for the vocabulary):
  target_logits [batch, num_nodes + 1, vocab]: index 0 judges the root's children (the target ran
      on the last committed token), index j + 1 judges the children of node j.
  proposal: DraftProposal with tokens/parents [batch, num_nodes] and optional draft_probs.

Greedy: walk from the root, at each node take the target's argmax; if a child carries that token
it is accepted and the walk goes on from it, else the argmax is the final (bonus) token.

Sampling (Leviathan et al. / SpecInfer multi-draft): at a node with target distribution p, try its
children in order.  A child x drawn from q is accepted with probability min(1, p(x) / q(x)); on
rejection p becomes normalise(max(0, p - q)) and the next child is tried.  A deterministic child
(no draft_probs) is a point mass q = one_hot(x): accepted with probability p(x), rejection zeroes
p(x).  When no child is accepted the final token is sampled from what is left of p (recovered);
when the walk reaches a leaf it is sampled from the leaf's p (bonus).  Every path yields tokens
distributed exactly as the target's p.
"""
from __future__ import annotations

import torch

from .sampling import greedy_tokens, probs_from_logits
from .types import PAD, DraftProposal, SamplingParams, VerifyResult


def verify(target_logits: torch.Tensor, proposal: DraftProposal, params: SamplingParams,
           generators: list[torch.Generator | None] | None = None) -> VerifyResult:
    if params.greedy:
        if proposal.is_chain():
            return verify_greedy_chain(target_logits, proposal)
        return verify_greedy_tree(target_logits, proposal)
    target_probs = probs_from_logits(target_logits, params)
    return verify_sampled_tree(target_probs, proposal, generators)


def verify_greedy_chain(target_logits: torch.Tensor, proposal: DraftProposal) -> VerifyResult:
    """Vectorised: accepted = cumulative product of (draft == target argmax)."""
    batch, n = proposal.tokens.shape
    target_tokens = greedy_tokens(target_logits)  # [batch, n + 1]
    matches = (proposal.tokens == target_tokens[:, :n]) & (proposal.tokens != PAD)
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)  # [batch]
    device = target_logits.device
    positions = torch.arange(n + 1, device=device).expand(batch, n + 1)
    # accepted drafts equal the target's argmax, so the output is the argmax up to the final token
    tokens = torch.where(positions <= num_accepted[:, None], target_tokens, PAD)
    nodes = torch.arange(n, device=device).expand(batch, n)
    accepted_nodes = torch.where(nodes < num_accepted[:, None], nodes, PAD)
    return VerifyResult(tokens, num_accepted, accepted_nodes)


def _children(tokens_row: torch.Tensor, parents_row: torch.Tensor) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for j, (tok, par) in enumerate(zip(tokens_row.tolist(), parents_row.tolist())):
        if tok != PAD:
            kids.setdefault(par, []).append(j)
    return kids


def _result(rows: list[tuple[list[int], list[int]]], num_nodes: int,
            device: torch.device) -> VerifyResult:
    """rows: per row (output tokens incl. final, accepted node path); built on the host (the
    tree walks ran there), copied to `device` once."""
    batch = len(rows)
    tokens = torch.full((batch, num_nodes + 1), PAD, dtype=torch.long, device="cpu")
    nodes = torch.full((batch, num_nodes), PAD, dtype=torch.long, device="cpu")
    for r, (toks, path) in enumerate(rows):
        tokens[r, :len(toks)] = torch.tensor(toks, dtype=torch.long, device="cpu")
        if path:
            nodes[r, :len(path)] = torch.tensor(path, dtype=torch.long, device="cpu")
    num_accepted = torch.tensor([len(path) for _, path in rows], dtype=torch.long, device="cpu")
    return VerifyResult(tokens.to(device), num_accepted.to(device), nodes.to(device))


def verify_greedy_tree(target_logits: torch.Tensor, proposal: DraftProposal) -> VerifyResult:
    target_tokens = greedy_tokens(target_logits).tolist()  # [batch][n + 1]
    draft = proposal.tokens.tolist()
    rows = []
    for r in range(len(draft)):
        kids = _children(proposal.tokens[r], proposal.parents[r])
        node, toks, path = -1, [], []
        while True:
            want = target_tokens[r][node + 1]
            toks.append(want)
            nxt = next((c for c in kids.get(node, []) if draft[r][c] == want), None)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        rows.append((toks, path))
    return _result(rows, proposal.tokens.shape[1], proposal.tokens.device)


def verify_sampled_tree(target_probs: torch.Tensor, proposal: DraftProposal,
                        generators: list[torch.Generator | None] | None = None) -> VerifyResult:
    """target_probs [batch, num_nodes + 1, vocab] already temperature/top-k/top-p processed."""
    batch = target_probs.shape[0]
    gens = generators or [None] * batch
    draft = proposal.tokens.tolist()
    rows = []
    for r in range(batch):
        kids = _children(proposal.tokens[r], proposal.parents[r])
        gen = gens[r]
        node, toks, path = -1, [], []
        while True:
            p = target_probs[r, node + 1].clone()
            accepted = None
            for child in kids.get(node, []):
                x = draft[r][child]
                q = None if proposal.draft_probs is None else proposal.draft_probs[r, child].double()
                qx = 1.0 if q is None else float(q[x])
                px = float(p[x])
                u = float(torch.rand((), generator=gen, dtype=torch.float64, device=p.device))
                if qx > 0 and u * qx < px:  # u < min(1, p/q) without dividing
                    accepted = child
                    break
                if q is None:
                    p[x] = 0.0
                else:
                    p = torch.clamp(p - q, min=0.0)
                total = float(p.sum())
                if total <= 0.0:  # p == q exactly: nothing left to correct, keep the target's p
                    p = target_probs[r, node + 1].clone()
                else:
                    p = p / total
            if accepted is None:
                toks.append(int(torch.multinomial(p, 1, generator=gen)))
                break
            toks.append(draft[r][accepted])
            path.append(accepted)
            node = accepted
        rows.append((toks, path))
    return _result(rows, proposal.tokens.shape[1], proposal.tokens.device)
