"""Translation between SGLang's decode batch and specplug's DraftInput / DraftProposal.

No algorithm lives here: rows in, committed tokens out; a proposal in, a fixed-width chain out.

Worked example, num_steps = 3, two requests in SGLang's batch order:
    req "a": prompt [5, 6], output [7]      -> DraftInput row 0: tokens [5, 6, 7]
    req "b": prompt [9],    output [4, 2]   -> DraftInput row 1: tokens [9, 4, 2]
    proposal tokens [[8, 1, 3], [6, PAD, PAD]]
    chain           [[8, 1, 3], [6, 6, 6]]   (a short chain repeats its last token)
SGLang verifies [bonus, chain...] per row, where the bonus is the last committed token (7, 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specplug.types import PAD, ROOT, DraftInput, DraftProposal


class RowIds:
    """Stable integer row ids for SGLang's string request ids (drafters key state on them), and
    how many tokens each request had committed at its last draft call."""

    def __init__(self):
        self._ids: dict[str, int] = {}
        self._drafted_upto: dict[str, int] = {}
        self._next = 0

    def of(self, rid: str) -> int:
        if rid not in self._ids:
            self._ids[rid] = self._next
            self._next += 1
        return self._ids[rid]

    def unseen(self, rid: str, num_committed: int) -> int:
        """What new_since_last_call would say now, without marking a call."""
        return num_committed - self._drafted_upto.get(rid, 0)

    def new_since_last_call(self, rid: str, num_committed: int) -> int:
        """Tokens request `rid` committed since its last draft call (all, on its first)."""
        before, self._drafted_upto[rid] = self._drafted_upto.get(rid, 0), num_committed
        return num_committed - before

    def pop(self, rid: str) -> int | None:
        self._drafted_upto.pop(rid, None)
        return self._ids.pop(rid, None)

    def pop_all(self) -> list[int]:
        ids = list(self._ids.values())
        self._ids.clear()
        self._drafted_upto.clear()
        return ids


def committed_tokens(req) -> list[int]:
    """Prompt plus output so far of one SGLang request (without multimodal padding ids)."""
    prompt = getattr(req, "origin_input_ids_unpadded", None)
    if prompt is None:
        prompt = req.origin_input_ids
    return list(prompt) + list(req.output_ids)


def draft_input(reqs, rows: RowIds, num_steps: int, bonus_tokens: torch.Tensor) -> DraftInput:
    """One DraftInput row per request, in the batch's order.

    bonus_tokens [batch]: the token each row's verify starts from.  Without overlap scheduling it
    is the last committed token; anything else means the committed tokens are stale, and drafting
    from them would propose for the wrong position.
    """
    tokens = [committed_tokens(r) for r in reqs]
    bonus = bonus_tokens.tolist()
    for req, toks, b in zip(reqs, tokens, bonus):
        if not toks or toks[-1] != b:
            raise RuntimeError(f"request {req.rid}: last committed token {toks[-1:]} is not the "
                               f"verify root {b} (is overlap scheduling on?)")
    return DraftInput(row_ids=[rows.of(r.rid) for r in reqs],
                      token_ids=[torch.tensor(t, dtype=torch.long) for t in tokens],
                      num_draft_tokens=num_steps,
                      num_new_committed=[rows.new_since_last_call(r.rid, len(t))
                                         for r, t in zip(reqs, tokens)])


def chain_tokens(proposal: DraftProposal, roots: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[batch, num_steps] int64 draft chain per row, from a chain proposal; on the proposal's
    device (the engine's), with no host round trip.  roots [batch]: each row's verify root.

    SGLang verifies a fixed width.  A row with fewer drafts repeats its last one (its root when it
    has none): greedy verification keeps a filler token only where it is the target's own choice,
    so the output is unchanged; it can only add accepted tokens, never wrong ones.
    """
    if not proposal.is_chain():
        raise ValueError("SGLang's specplug worker verifies chains; the drafter proposed a tree "
                         "(set its tree options off)")
    tokens = proposal.tokens[:, :num_steps]  # [batch, width], PAD only after a row's drafts
    batch, width = tokens.shape
    roots = roots.to(device=tokens.device, dtype=torch.long)
    count = (tokens != PAD).sum(1)  # [batch] drafts per row
    last = tokens.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0] if width else roots
    fill = torch.where(count > 0, last, roots)  # [batch]
    filled = fill[:, None].expand(batch, num_steps)
    if width:
        filled = torch.cat([tokens, filled[:, width:]], dim=1)
    steps = torch.arange(num_steps, device=tokens.device)
    return torch.where(steps < count[:, None], filled, fill[:, None])


@dataclass
class TreeVerifyTensors:
    """What SGLang's EAGLE verify reads for a tree (the outputs of its build_tree_kernel_efficient),
    built from a specplug proposal.  n = num_draft_tokens nodes per row, node 0 the root."""
    draft_tokens: torch.Tensor  # [batch * n] int64: root then the row's nodes
    positions: torch.Tensor  # [batch * n] int64: seq_len + depth
    tree_mask: torch.Tensor  # bool, flat: QLEN_ONLY [batch, n, n]; FULL_MASK rows of seq_len + n
    retrieve_index: torch.Tensor  # [batch, n] int64: flat index b * n + i of node i
    retrieve_next_token: torch.Tensor  # [batch, n] int64: first child (lowest index), -1 none
    retrieve_next_sibling: torch.Tensor  # [batch, n] int64: next sibling by index, -1 none


def tree_verify_tensors(proposal: DraftProposal, roots: torch.Tensor, seq_lens: list[int],
                        num_draft_tokens: int, max_depth: int, full_mask: bool) -> TreeVerifyTensors:
    """A proposal (chain or tree, any width) as SGLang's fixed-width verify tree.

    roots [batch]: each row's verify root (its last committed token); seq_lens: per row the
    committed tokens in the KV cache (the root's position).  Nodes past the width or deeper than
    max_depth are dropped (with their subtrees; parents precede children).  Missing nodes are
    filled with copies of the row's first node hung under the root (the root itself when the row
    has none): SGLang links siblings in index order and greedy verify takes the first match, so a
    filler is only reached where it is the target's own choice; it adds nothing wrong.

    Worked example, n = 4, one row, root 7 at position 10, proposal tokens [3, 5] parents [-1, 0]:
      draft_tokens [7, 3, 5, 3]   positions [10, 11, 12, 11]
      next_token [1, 2, -1, -1]   next_sibling [-1, 3, -1, -1]
    """
    n, device = num_draft_tokens, proposal.tokens.device
    width = n - 1
    tokens = proposal.tokens[:, :width]  # [batch, <= width]
    parents = proposal.parents[:, :width]
    batch = tokens.shape[0]
    roots = roots.to(device=device, dtype=torch.long)
    depth = DraftProposal(tokens, parents).depths()  # [batch, <= width], 0 on PAD
    keep = (tokens != PAD) & (depth <= max_depth)
    # a dropped node's children are dropped too: their depth exceeds it or they are PAD already,
    # except below a PAD parent, which proposals never have
    first = torch.where(keep[:, :1], tokens[:, :1], roots[:, None]) if width else roots[:, None]
    fill = first.expand(batch, width)
    node_tok = torch.full((batch, width), 0, dtype=torch.long, device=device)
    node_par = torch.full((batch, width), ROOT, dtype=torch.long, device=device)
    node_dep = torch.ones((batch, width), dtype=torch.long, device=device)
    w = tokens.shape[1]
    node_tok[:, :w] = torch.where(keep, tokens, fill[:, :w])
    node_par[:, :w] = torch.where(keep, parents, ROOT)
    node_dep[:, :w] = torch.where(keep, depth, 1)
    node_tok[:, w:] = fill[:, w:]
    # node i of SGLang's row is proposal node i - 1; parent ROOT becomes node 0
    par = torch.cat([torch.full((batch, 1), -1, dtype=torch.long, device=device), node_par + 1], 1)
    draft_tokens = torch.cat([roots[:, None], node_tok], 1)  # [batch, n]
    dep = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=device), node_dep], 1)
    base = torch.tensor(seq_lens, dtype=torch.long, device=device)[:, None]

    # ancestors-or-self: walk every node up max_depth times
    idx = torch.arange(n, device=device)
    anc = torch.zeros((batch, n, n), dtype=torch.bool, device=device)
    cur = idx.expand(batch, n).clone()
    for _ in range(max_depth + 1):
        valid = cur >= 0
        anc.scatter_(2, cur.clamp(min=0)[:, :, None], valid[:, :, None])
        cur = torch.where(valid, par.gather(1, cur.clamp(min=0)), -1)
    anc[:, :, 0] = True  # every node sees the root

    # children linked in index order: first child, then each child's next sibling
    child = (par[:, None, :] == idx[None, :, None])  # [batch, parent, node]
    next_token = torch.where(child, idx, n).amin(2)
    same = (par[:, :, None] == par[:, None, :]) & (idx[None, None, :] > idx[None, :, None])
    same &= (par[:, :, None] >= 0)
    next_sibling = torch.where(same, idx, n).amin(2)
    next_token = torch.where(next_token == n, -1, next_token)
    next_sibling = torch.where(next_sibling == n, -1, next_sibling)

    if full_mask:  # each query row also sees its request's whole committed prefix
        rows = [torch.cat([torch.ones((n, s), dtype=torch.bool, device=device), anc[b]], 1).flatten()
                for b, s in enumerate(seq_lens)]
        mask = torch.cat(rows) if rows else anc.flatten()
    else:
        mask = anc.flatten()
    return TreeVerifyTensors(
        draft_tokens=draft_tokens.flatten(), positions=(base + dep).flatten(), tree_mask=mask,
        retrieve_index=(torch.arange(batch, device=device)[:, None] * n + idx).long(),
        retrieve_next_token=next_token, retrieve_next_sibling=next_sibling)
