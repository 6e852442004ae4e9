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

import torch

from specplug.types import PAD, DraftInput, DraftProposal


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
