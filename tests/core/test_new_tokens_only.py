"""Drafters bring their state up to date from the newly committed tokens alone (#13 part 2).

The engine says how many tokens each row committed since its last draft call
(DraftInput.num_new_committed).  A drafter with per-row state then never reads the committed
tokens older than those, except the last token its state holds (row_slots.surviving_prefix
checks it): the one just before them, or for DFlash, whose last committed token has no feature
yet, the one before that.  Shown by handing the drafter contexts whose old part, bar those two
tokens, is overwritten with another token: every proposal, and so the output, must equal those of the
true contexts.  A drafter that read the whole context (as all of them did before) would draft
from the garbage and diverge.  N-gram lookup (and hybrid's lookup half) search the whole
context by design, and SpecDiff's exact mode re-reads it; they are not among these.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from specplug.drafters.base import Drafter
from specplug.drafters.row_slots import surviving_prefix
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request

sys.path.insert(0, os.path.dirname(__file__))
from test_engine_sampled_families import dflash, draft, eagle, eagle3, suffix  # noqa: E402

GARBAGE = 3


class Recorder(Drafter):
    """Wraps a drafter: records every proposal; with `blind`, overwrites each row's committed
    tokens older than the newly committed ones (bar the last two) before the drafter sees them."""

    def __init__(self, inner, blind: bool):
        self.inner, self.blind, self.proposals = inner, blind, []
        self.needs = inner.needs

    def release(self, row_ids):
        self.inner.release(row_ids)

    def propose(self, inp):
        assert inp.num_new_committed is not None, "the embedded engine must count new tokens"
        if self.blind:
            hidden = []
            for ids, new in zip(inp.token_ids, inp.num_new_committed):
                old = ids.shape[0] - new
                if old > 2:
                    ids = ids.clone()
                    ids[:old - 2] = GARBAGE
                hidden.append(ids)
            inp = dataclasses.replace(inp, token_ids=hidden)
        proposal = self.inner.propose(inp)
        self.proposals.append((proposal.tokens.tolist(), proposal.parents.tolist(),
                               _state_sizes(self.inner)))
        return proposal


def _state_sizes(drafter) -> list[int] | None:
    """How many context entries DFlash holds per row: its fixture's drafts depend on the last
    token alone (a markov target), so only its cache shows what it kept."""
    rows = getattr(drafter, "rows", None)
    return sorted(len(st.tokens) for st in rows.values()) if isinstance(rows, dict) else None


@pytest.mark.parametrize("family", [suffix, draft, eagle, eagle3, dflash], ids=lambda f: f.__name__)
def test_drafters_read_only_the_newly_committed_tokens(family, tmp_path):
    runs = {}
    for blind in (False, True):
        target, drafter, prompt = family(str(tmp_path / str(blind)))
        recorder = Recorder(drafter, blind)
        prompts = [prompt, prompt[1:] + prompt[:1], prompt[::-1]]
        outputs, stats = EmbeddedEngine(target, None, recorder, num_draft_tokens=3).generate(
            [Request(list(p), 20) for p in prompts], batch_size=3)
        runs[blind] = ([o.output_token_ids for o in outputs], recorder.proposals, stats)
    (want, want_props, stats), (got, got_props, _) = runs[False], runs[True]
    assert stats.num_accepted_tokens > 0 and len(want_props) > 3  # several steps, some accepted
    assert got_props == want_props
    assert got == want


def test_the_blinding_would_be_seen_by_a_drafter_that_reads_the_whole_context(tmp_path):
    """The control: n-gram lookup reads every committed token, and the blinding changes it."""
    from test_engine_sampled_families import ngram
    proposals = {}
    for blind in (False, True):
        target, drafter, prompt = ngram(str(tmp_path))
        recorder = Recorder(drafter, blind)
        EmbeddedEngine(target, None, recorder, num_draft_tokens=3).generate(
            [Request(list(prompt), 20)], batch_size=1)
        proposals[blind] = recorder.proposals
    assert proposals[True] != proposals[False]


def _ids(*tokens):
    return torch.tensor(tokens, dtype=torch.long)


@pytest.mark.parametrize("have,ids,num_new,want", [
    ([], (5, 6, 7), 3, (0, [5, 6, 7])),  # a new row: all of it
    ([5, 6], (5, 6, 7, 8), 2, (2, [7, 8])),  # two committed since: fed
    ([5, 6, 7, 9], (5, 6, 7, 8), 2, (3, [8])),  # cached draft 7 accepted, 9 rejected
    ([5, 6, 7, 8, 1], (5, 6, 7, 8), 2, (4, [])),  # every draft accepted: nothing to feed
    ([5, 6], (5, 6, 7, 8), None, (2, [7, 8])),  # the engine cannot say: compared whole
    ([5, 4], (5, 6, 7, 8), 2, (1, [6, 7, 8])),  # the count does not fit what the row held
    ([5, 6], (5, 6, 7, 8), 1, (2, [7, 8])),  # a state one token behind (DFlash: the last
    # committed token has no feature yet): what it lacks is fed, nothing older is compared
    ([5, 9], (5, 6, 7, 8), 1, (1, [6, 7, 8])),  # ... unless its last token is not committed
])
def test_surviving_prefix_table(have, ids, num_new, want):
    assert surviving_prefix(have, _ids(*ids), num_new) == want
