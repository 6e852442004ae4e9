"""Suffix decoding: propose what most often followed the context's longest recurring suffix.

Written from the published idea (Arctic Inference's suffix decoding; vLLM's method="suffix"),
not from any implementation.  Two suffix indexes (suffix_index.py) are consulted every step:
  * the row's own: its prompt and everything generated so far, updated with only the tokens
    committed since the last call (O(new tokens) per step);
  * a global one: the outputs of the last `global_requests` finished requests (an LRU; a
    request leaving it is removed again), so answers that repeat across requests are found.
The longer of the two matches wins (the row's own on a tie).  Below the matched node each
continuation is scored by how often it followed that suffix; the proposal keeps continuations
whose path probability is at least `min_prob`, and at most `spec_factor` x match-length tokens,
so a short, weak match proposes little and a long one proposes much.  The proposal stops by
itself, so the family's default cap is long (24 tokens a step, `Family.default_gamma`).

Defaults measured (SmolLM2-135M, bf16, batch 1, 128 new tokens, 3 interleaved repetitions,
CPU; benchmarks/results/he40_suffix_*_explore.json, mt24_suffix_g24_explore.json): on HumanEval
40, gamma 5 left 13% of steps at the cap; gamma 12 took the speedup from 1.87x (another run) to
1.99x; spec_factor 2 then to 2.11x (2.106-2.112, against 1.971-1.982 for spec_factor 1 in the
same run); spec_factor 4 fell back to 1.99x (long guesses from short matches cost verify width).
On MT-Bench 24, spec_factor 2 ran at 1.450x (1.426-1.479) against 1.373x (1.359-1.401).  Trees
of 24 nodes were within the chains' spread on both, so chains stay the default.

Chains by default (the best path, what vLLM and SGLang verify); `tree_nodes` > 0 proposes the
best tree of that many nodes instead (the embedded engine verifies trees).  Deterministic, so
verified as point masses (draft_probs None).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..types import DraftInput, DraftProposal
from .base import Drafter, DrafterSpec, Family, TargetInfo, register_drafter
from .suffix_index import StreamCursor, SuffixIndex, best_continuations


@dataclass
class SuffixOptions:
    max_match: int = 12  # longest context suffix looked up
    max_spec_depth: int = 16  # longest continuation the index can hold below a full match
    spec_factor: float = 2.0  # tokens proposed at most per matched token
    min_prob: float = 0.1  # prune continuations less likely than this
    tree_nodes: int = 0  # 0: a chain; else the best tree of at most this many nodes
    global_requests: int = 256  # finished requests whose outputs stay indexed (0: none)

    def check(self) -> None:
        if self.max_match < 1 or self.max_spec_depth < 1 or self.spec_factor <= 0:
            raise ValueError("suffix: max_match, max_spec_depth and spec_factor must be positive")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"suffix: min_prob must lie in [0, 1], got {self.min_prob}")
        if self.tree_nodes < 0 or self.global_requests < 0:
            raise ValueError("suffix: tree_nodes and global_requests must be >= 0")


@dataclass
class _Row:
    index: SuffixIndex
    cursor: StreamCursor = field(default_factory=StreamCursor)
    tokens: list[int] = field(default_factory=list)  # the stream, kept for the global index
    prompt_len: int = 0


class SuffixDrafter(Drafter):
    scores_nodes = True  # each node's path probability: how often its path followed the match

    def __init__(self, options: SuffixOptions = SuffixOptions(),
                 device: torch.device | str | None = None):
        options.check()
        self.opt = options
        self.device = device  # the target's: proposals go there (None: torch's default)
        self.depth = options.max_match + options.max_spec_depth
        self.rows: dict[int, _Row] = {}
        self.finished = SuffixIndex(self.depth)
        self.finished_streams: OrderedDict[int, list[int]] = OrderedDict()  # LRU, oldest first
        self._serial = 0

    def propose(self, inp: DraftInput) -> DraftProposal:
        rows, scores = [], []
        for rid, ids in zip(inp.row_ids, inp.token_ids):
            row = self._catch_up(rid, ids)
            tokens, parents, probs = self._draft(row.tokens[-self.opt.max_match:], row.index,
                                                 inp.num_draft_tokens)
            rows.append((tokens, parents))
            scores.append(probs)
        return DraftProposal.from_rows(rows, self.device, scores)

    def release(self, row_ids: list[int]) -> None:
        """Finished rows: their outputs join the global index, the oldest ones leave it."""
        for rid in row_ids:
            row = self.rows.pop(rid, None)
            if row is None or self.opt.global_requests == 0:
                continue
            output = row.tokens[row.prompt_len:]
            if len(output) < 2:
                continue
            self.finished.append(StreamCursor(), output)
            self.finished_streams[self._serial] = output
            self._serial += 1
            while len(self.finished_streams) > self.opt.global_requests:
                _, old = self.finished_streams.popitem(last=False)
                self.finished.remove(old)

    # -- steps -----------------------------------------------------------------------------------
    def _catch_up(self, rid: int, ids) -> _Row:
        """Index the tokens committed since this row's last call.  ids: [n] committed tokens."""
        n = int(ids.shape[0])
        row = self.rows.get(rid)
        have = row.cursor.length if row else 0
        # a row id that now holds another request (shorter, or another token where ours ended)
        if row is None or have > n or (have and int(ids[have - 1]) != row.tokens[-1]):
            row = self.rows[rid] = _Row(SuffixIndex(self.depth), prompt_len=max(n - 1, 0))
            have = 0
        new = ids[have:].tolist()  # only the new tokens cross to the host
        row.index.append(row.cursor, new)
        row.tokens += new
        return row

    def _draft(self, tail: list[int], own: SuffixIndex, gamma: int
               ) -> tuple[list[int], list[int], list[float]]:
        """(tokens, parents, path probabilities) below the longest match of `tail` in the row's
        or the global index."""
        node, m = own.longest_match(tail, self.opt.max_match)
        other, m_other = self.finished.longest_match(tail, self.opt.max_match)
        if m_other > m:
            node, m = other, m_other
        if node is None or gamma <= 0:
            return [], [], []
        budget = min(self.opt.tree_nodes or gamma, math.ceil(self.opt.spec_factor * m))
        depth = min(gamma, self.depth - m)
        if not self.opt.tree_nodes:
            return _best_chain(node, budget, depth, self.opt.min_prob)
        picked = best_continuations(node, budget, depth, self.opt.min_prob)
        return [t for t, _, _ in picked], [p for _, p, _ in picked], [q for _, _, q in picked]


def _best_chain(node, length: int, depth: int, min_prob: float
                ) -> tuple[list[int], list[int], list[float]]:
    """Follow the most frequent continuation while its path probability stays >= min_prob."""
    tokens, probs, prob = [], [], 1.0
    while node.children and len(tokens) < min(length, depth):
        total = sum(c.count for c in node.children.values())
        tok, child = max(node.children.items(), key=lambda kv: kv[1].count)
        prob *= child.count / total
        if prob < min_prob:
            break
        tokens.append(tok)
        probs.append(prob)
        node = child
    return tokens, list(range(-1, len(tokens) - 1)), probs


FAMILY = Family("suffix", needs_weights=False, reads_hidden_states=False,
                 vllm_lookup_method="suffix",
                 sglang_plugin_name="SPECPLUG_SUFFIX", default_gamma=24)


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> SuffixDrafter:
    known = SuffixOptions.__dataclass_fields__
    unknown = set(spec.options) - set(known)
    if unknown:
        raise ValueError(f"suffix: unknown options {sorted(unknown)}; known: {', '.join(known)}")
    types = {"max_match": int, "max_spec_depth": int, "spec_factor": float, "min_prob": float,
             "tree_nodes": int, "global_requests": int}
    options = SuffixOptions(**{k: types[k](v) for k, v in spec.options.items()})
    options.check()  # before the target is asked anything: bad options are the first error
    return SuffixDrafter(options, target.device)
