"""Hybrid: prompt lookup and a trained head, combined per row and per step.

Both inner drafters are built through the registry.  The engine hands each target feature over
once, and a head must see every one: in "switch" mode the hybrid keeps the features of steps
where the lookup served every row and hands them to the head, all at once, on the next step that
needs it (one catch-up pass over several entries instead of a head pass per step).  Per row:
  mode "switch"  the lookup's chain when it matched an n-gram of at least `min_match` tokens and
                 proposes at least `min_lookup_tokens` tokens, else the head's proposal;
  mode "tree"    both, merged into one prefix tree (shared prefixes verified once), lookup
                 branch first.  Costs a wider verify pass, never a lower accept length.
                 With `skip_head_tokens` n > 0, a step where every row's lookup expects at
                 least n accepted tokens (its nodes' path probabilities summed: a scored
                 lookup such as suffix; a long match with a settled continuation) takes the
                 lookup's tree alone and keeps the features for the head, as "switch" does:
                 the head's pass is most of a hybrid's drafting, and where the lookup is that
                 sure it rarely adds.
                 With `head_gate` on, the head runs only while the tokens it added on recent
                 steps are worth its time in the step (drafters/head_gate.py; the tokens
                 credited x `head_gate_credit`, 1.5); skipped steps keep its features the
                 same way.

Worked example, gamma 3, committed "... the cat sat on the mat . the cat":
  lookup (3-gram ". the cat" matched) -> [sat, on, the];  head -> [sat, down, .]
  switch: [sat, on, the]           tree: sat(-1) on(0) the(1) down(0) .(3)

Lossless at any temperature: a lookup chain is deterministic (a point mass); in "switch" mode a
row that takes it gets a one-hot draft distribution next to the head's rows; in "tree" mode every
node is verified as a point mass, which is lossless for any draft chosen without looking at the
target's random numbers (see verify.py).

Options: head_method (default: detected from the drafter folder), head_* (passed to the head with
the prefix removed, e.g. head_tree_topk), mode, lookup ("ngram" with max_ngram (4) and
min_match (2), or "suffix" with suffix options prefixed lookup_), min_lookup_tokens (1),
skip_head_tokens (0: never; tree mode), head_gate (off; tree mode), head_gate_credit (1.5).
DrafterSpec.path is the head's checkpoint folder.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..types import PAD, ROOT, DraftInput, DraftProposal
from .base import (Drafter, DrafterSpec, Family, TargetInfo, build_drafter, option_is_set,
                   register_drafter)
from .head_gate import HeadGate

MODES = ("switch", "tree")


class HybridDrafter(Drafter):
    def __init__(self, lookup: Drafter, head: Drafter, mode: str = "switch",
                 min_lookup_tokens: int = 1, skip_head_tokens: float = 0.0,
                 head_gate: HeadGate | None = None):
        if mode not in MODES:
            raise ValueError(f"hybrid mode {mode!r}: choose one of {', '.join(MODES)}")
        if min_lookup_tokens < 1:
            raise ValueError(f"min_lookup_tokens must be >= 1, got {min_lookup_tokens}")
        if skip_head_tokens < 0:
            raise ValueError(f"skip_head_tokens must be >= 0, got {skip_head_tokens}")
        if skip_head_tokens and mode != "tree":
            raise ValueError("skip_head_tokens applies to mode 'tree' (mode 'switch' skips the "
                             "head wherever the lookup matched)")
        if head_gate is not None and mode != "tree":
            raise ValueError("head_gate applies to mode 'tree' (mode 'switch' skips the head "
                             "wherever the lookup matched)")
        self.lookup, self.head = lookup, head
        self.gate = head_gate
        self.mode, self.min_lookup_tokens = mode, min_lookup_tokens
        self.skip_head_tokens = skip_head_tokens
        self.needs = head.needs  # the lookup needs token ids only
        # both halves score their nodes (suffix lookup, EAGLE heads): so do the merged proposals
        self.scores_nodes = lookup.scores_nodes and head.scores_nodes
        self.used_lookup = 0  # rows x steps that took the lookup (or had it in their tree)
        self.used_head = 0
        self.head_calls = 0
        # row id -> (first position, feature blocks) the head has not seen yet
        self.pending: dict[int, tuple[int, list[torch.Tensor]]] = {}

    def release(self, row_ids: list[int]) -> None:
        self.lookup.release(row_ids)
        self.head.release(row_ids)
        for rid in row_ids:
            self.pending.pop(rid, None)

    def propose(self, inp: DraftInput) -> DraftProposal:
        if self.gate is not None:
            self.gate.start_call(inp.row_ids, inp.token_ids)
        from_lookup = self.lookup.propose(inp)
        found = from_lookup.num_nodes >= self.min_lookup_tokens  # [batch]
        if self._lookup_serves_all(found, from_lookup) or (
                self.gate is not None and not self.gate.wants_head()):
            # the head's drafts would be thrown away, or would not pay: skip it (a token-only
            # head reconciles from the committed tokens; a feature head gets this step's
            # features later)
            if inp.hidden_states is not None:
                self._keep_features(inp)
            if self.gate is not None:
                self.gate.skipped_head()
            self.used_lookup += len(inp.row_ids)
            return from_lookup
        began = self.gate.clock() if self.gate is not None else 0.0
        from_head = self.head.propose(self._with_pending_features(inp))
        self.head_calls += 1
        use = found.tolist()  # one host read for the counts and the merge's per-row choice
        self.used_lookup += sum(use)
        self.used_head += len(use) - sum(use) if self.mode == "switch" else len(use)
        if self.mode == "switch":
            return switch_rows(from_lookup, from_head, found)
        # the merge walks node lists on the host (a few nodes per row); the gate reads the same
        lookup_rows, head_rows = host_rows(from_lookup), host_rows(from_head)
        merged = merge_host_rows(lookup_rows, head_rows, use, from_head.tokens.device)
        if self.gate is not None:
            self.gate.ran_head((self.gate.clock() - began) * 1e3, inp.row_ids, inp.token_ids,
                               [row if ok else ([], [], None) for row, ok in zip(lookup_rows, use)],
                               head_rows)
        return merged

    def _lookup_serves_all(self, found: torch.Tensor, proposal: DraftProposal) -> bool:
        """found [batch]: rows whose lookup proposed enough.  Whether this step skips the head:
        in "switch" mode when every row found a match; in "tree" mode (skip_head_tokens set)
        when every row's lookup also expects at least skip_head_tokens accepted tokens (a
        node's score is the probability its whole path is accepted, so their sum is the
        expected accept length).  A host decision: asked only where the head can be skipped."""
        if self.mode == "switch":
            return bool(found.all())
        if not self.skip_head_tokens or proposal.scores is None or not bool(found.all()):
            return False
        expected = proposal.scores.masked_fill(proposal.tokens == PAD, 0.0).sum(dim=1)  # [batch]
        return bool((expected >= self.skip_head_tokens).all())

    def _keep_features(self, inp: DraftInput) -> None:
        for r, rid in enumerate(inp.row_ids):
            feats, start = inp.hidden_states[r], inp.hidden_start[r]
            if feats is None or not feats.shape[0]:
                continue
            first, blocks = self.pending.get(rid, (start, []))
            if first + sum(b.shape[0] for b in blocks) != start:
                first, blocks = start, []  # not contiguous (a new request in this row)
            self.pending[rid] = (first, blocks + [feats])

    def _with_pending_features(self, inp: DraftInput) -> DraftInput:
        """inp with each row's kept features put in front of this step's."""
        if not self.pending or inp.hidden_states is None:
            return inp
        feats, starts = list(inp.hidden_states), list(inp.hidden_start)
        for r, rid in enumerate(inp.row_ids):
            first, blocks = self.pending.pop(rid, (None, []))
            if not blocks:
                continue
            end = first + sum(b.shape[0] for b in blocks)
            now = feats[r] if feats[r] is not None else blocks[0][:0]
            if starts[r] == end or not now.shape[0]:
                feats[r], starts[r] = torch.cat(blocks + [now]), first
        return replace(inp, hidden_states=feats, hidden_start=starts)


def switch_rows(lookup: DraftProposal, head: DraftProposal, take_lookup: torch.Tensor) -> DraftProposal:
    """Per row, the lookup's proposal where take_lookup [batch] is set, else the head's."""
    batch, dev = take_lookup.shape[0], head.tokens.device
    # the width is a shape, so the host must know whether any row takes the lookup
    width = max(lookup.tokens.shape[1] if take_lookup.any() else 0, head.tokens.shape[1])
    tokens = torch.full((batch, width), PAD, dtype=torch.long, device=dev)
    parents = torch.full((batch, width), ROOT, dtype=torch.long, device=dev)
    scored = lookup.scores is not None and head.scores is not None
    scores = torch.zeros((batch, width), dtype=torch.float32, device=dev) if scored else None
    for src, rows in ((lookup, take_lookup), (head, ~take_lookup)):
        n = min(src.tokens.shape[1], width)
        tokens[rows, :n] = src.tokens[rows, :n]
        parents[rows, :n] = src.parents[rows, :n]
        if scored:
            scores[rows, :n] = src.scores[rows, :n]
    probs = None
    if head.draft_probs is not None:
        vocab = head.draft_probs.shape[-1]
        probs = head.draft_probs.new_zeros(batch, width, vocab)
        n = head.tokens.shape[1]
        probs[~take_lookup, :n] = head.draft_probs[~take_lookup]
        # a lookup token is a point mass: one-hot q accepts with probability p(x), like None
        look = take_lookup[:, None] & (tokens != PAD)
        rows, cols = look.nonzero(as_tuple=True)
        probs[rows, cols, tokens[rows, cols]] = 1.0
    return DraftProposal(tokens, parents, probs, scores)


def host_rows(proposal: DraftProposal) -> list[tuple[list[int], list[int], list | None]]:
    """Per row the tree as host lists: (tokens, parents, scores or None), one read a tensor."""
    tokens, parents = proposal.tokens.tolist(), proposal.parents.tolist()
    scores = proposal.scores.tolist() if proposal.scores is not None else [None] * len(tokens)
    return list(zip(tokens, parents, scores))


def merge_trees(first: DraftProposal, second: DraftProposal, use_first: torch.Tensor) -> DraftProposal:
    """Per row, the union of two trees (merge_host_rows); use_first [batch]."""
    return merge_host_rows(host_rows(first), host_rows(second), use_first.tolist(),
                           first.tokens.device)


def merge_host_rows(first: list, second: list, use_first: list[bool], device) -> DraftProposal:
    """Per row, the union of two trees (host_rows) as one prefix tree (first's nodes first);
    rows where use_first is unset get the second tree only.  Verified as point masses.  Where
    both score their nodes, a node in both trees keeps the higher score (either estimates the
    chance of the same path)."""
    scored = bool(first) and first[0][2] is not None and second[0][2] is not None
    rows, row_scores = [], []
    for one, two, use in zip(first, second, use_first):
        tokens, parents, scores, index = [], [], [], {}  # index: (new parent, token) -> node
        for src_tokens, src_parents, src_scores in ((one, two) if use else (two,)):
            remap = {}
            src_scores = src_scores if scored else [0.0] * len(src_tokens)
            for j, (tok, par) in enumerate(zip(src_tokens, src_parents)):
                if tok == PAD or (par != ROOT and par not in remap):
                    continue
                new_par = ROOT if par == ROOT else remap[par]
                key = (new_par, tok)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(new_par)
                    scores.append(src_scores[j])
                scores[index[key]] = max(scores[index[key]], src_scores[j])
                remap[j] = index[key]
        rows.append((tokens, parents))
        row_scores.append(scores)
    return DraftProposal.from_rows(rows, device, row_scores if scored else None)


def _head_spec(spec: DrafterSpec) -> DrafterSpec:
    opts = spec.options
    method = opts.get("head_method")
    if not method:
        if not spec.path:
            raise ValueError("method 'hybrid' needs --drafter PATH (the head's folder) or "
                             "option head_method (e.g. head_method=draft)")
        from .detect import detect_method
        method = detect_method(spec.path)
    if method == "hybrid":
        raise ValueError("hybrid head_method cannot be 'hybrid'")
    head_opts = {k[len("head_"):]: v for k, v in opts.items()
                 if k.startswith("head_") and k not in ("head_method", "head_path")}
    return DrafterSpec(str(method), opts.get("head_path") or spec.path, head_opts)


def _lookup_spec(opts: dict) -> DrafterSpec:
    """option lookup: "ngram" (max_ngram, min_match) or "suffix" (its options prefixed lookup_,
    e.g. lookup_min_prob; a chain, as the merge rules expect)."""
    kind = str(opts.get("lookup", "ngram"))
    if kind == "suffix":
        return DrafterSpec("suffix", None, {k[len("lookup_"):]: v for k, v in opts.items()
                                            if k.startswith("lookup_") and k != "lookup_tree_nodes"})
    if kind != "ngram":
        raise ValueError(f"hybrid option lookup must be 'ngram' or 'suffix', got {kind!r}")
    max_ngram = int(opts.get("max_ngram", 4))
    min_match = int(opts.get("min_match", 2))
    if not 1 <= min_match <= max_ngram:
        raise ValueError(f"hybrid needs 1 <= min_match ({min_match}) <= max_ngram ({max_ngram})")
    # an n-gram drafter whose shortest n is min_match proposes nothing without such a match
    return DrafterSpec("ngram", None, {"max_ngram": max_ngram, "min_ngram": min_match})


FAMILY = Family("hybrid", needs_weights=True, reads_hidden_states=True,
                sglang_plugin_name="SPECPLUG_HYBRID")


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> HybridDrafter:
    opts = spec.options
    lookup = build_drafter(_lookup_spec(opts), target)
    head = build_drafter(_head_spec(spec), target)
    gated = option_is_set(opts.get("head_gate", "off"), "hybrid option head_gate")
    gate = HeadGate(credit=float(opts.get("head_gate_credit", 1.5))) if gated else None
    return HybridDrafter(lookup, head, str(opts.get("mode", "switch")),
                         int(opts.get("min_lookup_tokens", 1)),
                         float(opts.get("skip_head_tokens", 0.0)), gate)
