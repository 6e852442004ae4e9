"""Drafting with an EAGLE-style head (EAGLE-1/2 or EAGLE-3): per-row head KV cache, chains, trees.

A head is any module with
    head(tokens [b, q], feats [b, q, F], positions [b, q], kv: SlotCache, mask [b, q, slots],
         from_target: bool, logits_at [b] = None, real [b, q] = None)
      -> (out_feats [b, q, F'], logits [b, q, target_vocab])
where the entry for committed token x_j reads the target feature of position j - 1
(`from_target` True) and a draft entry reads the head's own previous output (False).

Per call, each row's cache is reconciled with the committed tokens (row_slots.surviving_prefix):
entries survive while their tokens agree with the committed prefix (a feature at j - 1 depends
on x_0..x_{j-1} only), the rest are dropped and rebuilt from the features the engine hands over
for positions [hidden_start, num_committed - 1).  Draft entries are cropped when the call ends, so the cache
only ever holds committed entries between calls.

Dynamic draft length (option min_confidence, chains only): a row stops drafting at the first
step whose top draft probability falls below the threshold (its first draft is always kept).
A weak head then stops paying for draft steps and verify width it would mostly lose; the stop
depends on the draft's own distribution only, so verification stays lossless.
"""
from __future__ import annotations

import torch

from ..engine.kv import SlotCache
from ..sampling import greedy_tokens, probs_from_logits, sample
from ..types import PAD, DraftInput, DraftProposal, DrafterNeeds
from .base import Drafter
from .decoder_layer import Ragged
from .row_slots import RowSlots, surviving_prefix
from .tree import TreeSettings, expand_tree


class EagleDrafter(Drafter):
    # each draft's path probability under the head (a chain's running product of q(x), a tree
    # node's cumulative top-k probability): a budget keeps the confident ones
    scores_nodes = True

    def __init__(self, head, hidden_layers: tuple[int, ...], tree: TreeSettings | None = None,
                 min_confidence: float = 0.0):
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        if tree is not None and min_confidence > 0:
            raise ValueError("min_confidence applies to chains; drop it or the tree_* options")
        self.head = head.eval()
        self.device = next(head.parameters()).device  # the target's (the loaders put it there)
        self.min_confidence = min_confidence
        self.needs = DrafterNeeds(hidden_layers=tuple(hidden_layers))
        self.tree = tree
        self.kv = SlotCache(0, self.device)
        self.slots = RowSlots(self.kv)
        self.context: dict[int, list[int]] = {}  # x_0..x_m: the row has entries for x_1..x_m
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # last entry's (feat, logits)

    # -- row bookkeeping ----------------------------------------------------------------------
    def release(self, row_ids: list[int]) -> None:
        self.slots.drop(row_ids)
        for rid in row_ids:
            self.context.pop(rid, None)
            self.last.pop(rid, None)

    # -- one call -----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, inp: DraftInput) -> DraftProposal:
        for rid in self.slots.align(inp.row_ids):
            self.context[rid] = []
            self.last.pop(rid, None)
        feats, logits, ready = self._catch_up(inp)
        if not ready.any():
            return DraftProposal.empty(len(inp.row_ids), self.device)
        # [b] last committed position
        base = torch.tensor([len(t) - 1 for t in inp.token_ids], device=self.device)
        committed_width = self.kv.width
        try:
            if self.tree is not None:
                topk, depth, nodes = self.tree.resolve(inp.num_draft_tokens)
                proposal = self._draft_tree(feats, logits, base, topk, depth, nodes)
            else:
                proposal = self._draft_chain(inp, feats, logits, base)
        finally:
            self.kv.crop(committed_width)  # forget draft entries
        proposal.tokens[~ready] = PAD
        proposal.scores[~ready] = 0.0
        return proposal

    def _catch_up(self, inp: DraftInput):
        """Feed each row the committed entries its cache lacks.  Returns the last entry's
        (feats [b, F'], logits [b, V]) and ready [b] (rows that have at least one entry)."""
        b = len(inp.row_ids)
        feeds: list[tuple[list[int], torch.Tensor | None, int]] = []  # (tokens, feats, first pos)
        for r, (rid, ids) in enumerate(zip(inp.row_ids, inp.token_ids)):
            have, n = self.context[rid], int(ids.shape[0])
            num_new = inp.num_new_committed[r] if inp.num_new_committed else None
            common, rest = surviving_prefix(have, ids, num_new)  # rest: ids[common:]
            keep = max(common - 1, 0)  # entries still valid (x_1..x_keep)
            self.kv.truncate(r, keep + 1)
            if keep < len(have) - 1:
                self.last.pop(rid, None)
            if common:
                del have[keep + 1:]  # x_0..x_keep
            else:
                have[:] = rest[:1]
            new = rest[keep + 1 - common:]  # x_{keep+1} .. x_{n-1}
            want = n - 1 - keep  # entries to (re)build
            if want == 0:
                feeds.append(([], None, 0))
                continue
            start = inp.hidden_start[r] if inp.hidden_start else 0
            given = inp.hidden_states[r] if inp.hidden_states else None
            have_feats = 0 if given is None else given.shape[0]
            if start > keep or start + have_feats < n - 1:
                raise RuntimeError(
                    f"eagle drafter, row {rid}: needs target features for positions "
                    f"[{keep}, {n - 1}) but got [{start}, {start + have_feats})")
            feeds.append((new, given[keep - start:n - 1 - start], keep + 1))
            have += new
        width = max(len(f[0]) for f in feeds)
        if width:
            self._feed(feeds, width, inp.row_ids)
        ready = torch.tensor([rid in self.last and len(self.context[rid]) == len(ids)
                              for rid, ids in zip(inp.row_ids, inp.token_ids)], dtype=torch.bool,
                             device=self.device)
        if not ready.any():
            return None, None, ready
        feat0, logits0 = next(self.last[rid] for rid, ok in zip(inp.row_ids, ready) if ok)
        feats = feat0.new_zeros(b, feat0.shape[-1])
        logits = logits0.new_zeros(b, logits0.shape[-1])
        for r, rid in enumerate(inp.row_ids):
            if ready[r]:
                feats[r], logits[r] = self.last[rid]
        return feats, logits, ready

    def _feed(self, feeds, width: int, row_ids: list[int]) -> None:
        b = len(feeds)
        feat_dim = next(f[1].shape[-1] for f in feeds if f[1] is not None)
        dev = self.device
        # token ids are host lists: laid out on the host, copied over once
        tokens = torch.zeros(b, width, dtype=torch.long, device="cpu")
        feats = torch.zeros(b, width, feat_dim, dtype=self._dtype(), device=dev)
        for r, (toks, f, _) in enumerate(feeds):
            if toks:
                tokens[r, :len(toks)] = torch.tensor(toks, device="cpu")
                feats[r, :len(toks)] = f.to(feats.dtype)
        tokens = tokens.to(dev)
        positions, real = self.kv.ragged_block([f[2] for f in feeds], [len(f[0]) for f in feeds])
        block = torch.ones(width, width, dtype=torch.bool, device=dev).tril() & real[:, None, :]
        block = block | torch.eye(width, dtype=torch.bool, device=dev)  # padding sees itself: no NaN
        mask = torch.cat([self.kv.valid[:, None, :].expand(b, width, -1), block], dim=2)
        self.kv.reserve(positions)
        # [b] entry to score
        last = torch.tensor([max(len(f[0]) - 1, 0) for f in feeds], device=dev)
        # only the real entries go through the head's projections and MLP: rows catching up on
        # prompts of mixed lengths leave most of the block padding
        ragged = Ragged.from_counts([len(f[0]) for f in feeds], width, dev)
        out, logits = self.head(tokens, feats, positions, self.kv, mask, True, logits_at=last,
                                ragged=ragged)
        self.kv.keep(real)
        for r, (toks, _, _) in enumerate(feeds):
            if toks:
                self.last[row_ids[r]] = (out[r, len(toks) - 1], logits[r, 0])

    # -- drafting -----------------------------------------------------------------------------
    def _draft_chain(self, inp: DraftInput, feats, logits, base) -> DraftProposal:
        b, gamma = len(inp.row_ids), inp.num_draft_tokens
        tokens = torch.full((b, gamma), PAD, dtype=torch.long, device=self.device)
        sampled = not inp.sampling.greedy
        probs = (torch.zeros(b, gamma, logits.shape[-1], dtype=torch.float64, device=self.device)
                 if sampled else None)
        gens = inp.generators or [None] * b
        chain_start = self.kv.width
        alive = torch.ones(b, dtype=torch.bool, device=self.device)  # rows still drafting
        # [b, gamma] each draft's path probability under the head: the budget's confidence
        scores = torch.zeros(b, gamma, dtype=torch.float32, device=self.device)
        path = torch.ones(b, dtype=torch.float32, device=self.device)
        for step in range(gamma):
            p = (probs_from_logits(logits, inp.sampling) if sampled
                 else torch.softmax(logits.float(), dim=-1))
            if sampled:
                probs[:, step] = p
                tokens[:, step] = torch.tensor([sample(p[r], gens[r]) for r in range(b)],
                                               device=self.device)
            else:
                tokens[:, step] = greedy_tokens(logits)
            mass = p.gather(1, tokens[:, step:step + 1])[:, 0].float()  # [b] the draft's q(x)
            path = path * mass
            scores[:, step] = path
            if self.min_confidence > 0:
                sure = p.max(-1).values >= self.min_confidence
                if step:
                    tokens[~(alive & sure), step] = PAD
                alive &= sure
                if not alive.any():  # the host decides whether to draft on: one sync per step
                    break
            if step + 1 == gamma:
                break
            # every draft slot so far belongs to this row's chain
            visible = self.kv.valid.clone()
            visible[:, chain_start:] = True
            mask = torch.cat([visible, visible.new_ones(b, 1)], dim=1)[:, None, :]
            positions = (base + step + 1)[:, None]
            self.kv.reserve(positions)
            out, out_logits = self.head(tokens[:, step:step + 1].clamp(min=0), feats[:, None],
                                        positions, self.kv, mask, False)
            feats, logits = out[:, 0], out_logits[:, 0]
        return DraftProposal.chain(tokens, probs, scores.masked_fill(tokens == PAD, 0.0))

    def _draft_tree(self, root_feats, root_logits, base, topk, depth, nodes) -> DraftProposal:
        b = root_feats.shape[0]
        state = {"feats": root_feats[:, None], "visible": self.kv.valid[:, None, :], "level": 0}

        def expand(tokens: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
            k = tokens.shape[1]
            par = parent.clamp(min=0)
            feats = state["feats"].gather(1, par[:, :, None].expand(-1, -1, state["feats"].shape[-1]))
            visible = state["visible"].gather(1, par[:, :, None].expand(-1, -1, state["visible"].shape[-1]))
            width_before = self.kv.width
            visible = torch.cat([visible, visible.new_zeros(b, k, width_before - visible.shape[-1])],
                                dim=2)
            itself = torch.eye(k, dtype=torch.bool, device=visible.device).expand(b, k, k)
            mask = torch.cat([visible, itself], dim=2)
            state["level"] += 1
            positions = (base + state["level"])[:, None].expand(b, k)
            self.kv.reserve(positions)
            out, logits = self.head(tokens, feats, positions, self.kv, mask, False)
            state["feats"], state["visible"] = out, mask  # a node sees what its parent saw + itself
            return torch.log_softmax(logits.double(), dim=-1)

        root_logprobs = torch.log_softmax(root_logits.double(), dim=-1)
        return expand_tree(root_logprobs, expand, topk, depth, nodes)

    # -- helpers ------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype
