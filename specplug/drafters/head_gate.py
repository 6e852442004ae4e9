"""Whether a tree-mode hybrid's head pays for itself: it runs only while the tokens it adds
are worth the time it takes.

The hybrid's tree is the union of the lookup's tree and the head's.  The head is most of its
drafting time (SmolLM2, bf16, CPU: 2.6-2.8 ms a step at batch 1, 4.3 ms at batch 10 even under
the speculation budget) and adds accepted tokens only where its branch runs deeper than the
lookup's: on HumanEval suffix alone ran at 1.88x and the hybrid at 1.78x, and at batch 10 the
hybrid lost to plain decoding (0.90x) where suffix won (1.05x).

Per step that ran the head, the gate measures:
  H  the head's time: its catch-up over the step's features, its drafting, the merge;
  T  the whole step's time, from this call of the hybrid to its next;
  G  tokens the head added: per row, how far the tokens committed next follow the head's tree
     past where they follow the lookup's.  A path of the union lies in one of the two trees
     (merge_trees keeps each tree's shape), so the union accepts the longer walk;
  N  tokens committed: per row, the union's walk plus the one token verification adds.
     Both walks stop at the tokens accepted: where the budget cut a tree, the token
     verification adds can match a node it cut (at batch 10 that counted tokens the head
     never added, and the gate kept a head that lost: 0.925x against 0.995x without it).
Skipping the head gives up G of N and shortens the step to S: with the head a step makes N / T
tokens a ms, without it about (N - G) / S, so the head pays while G / N > 1 - S / T.  A
measured step is one whose previous call ran the head too: after skipped steps the head first
catches up on their features, once.

S is measured, on steps that skip the head: the head's nodes also widen the verify pass, which
H leaves out and which grows with the batch.  At batch 10 under the budget, a gate that took S
as T - H kept a head that did not pay (0.906x of plain against 0.964x for the hybrid without a
gate).  So while the head runs it is skipped for `probe_steps` steps to time S, first after
`check_every` steps, then after twice as many each time, up to `check_max`: a check gives up
the head's tokens on its steps, and with checks every 64 steps the gated hybrid ran at 1.313x
on MT-Bench where the hybrid ran at 1.337x (tau 1.70 against 1.75).  Until `min_skips` steps
are timed, S is taken as T - H (so G / N > H / T).

G and N are sums over a long memory: each measured step first scales them by 1 - 1 / `memory`
(128).  G is mostly 0 with a few 2s and 3s, so a short window swings across the threshold by
chance, and a gate that switched off on one bad window stayed off: its probes added 2 steps to
a window of old bad ones, each failed probe doubled the wait, and on MT-Bench the head ran on
212 of 1237 steps where it paid.  H and T are the medians of the last `window` measured steps
(a step that admits requests also pays for a prefill).  Each timed skipped step gives S / T
against the median T of the 8 measured steps before it (step times drift with the context by
a third within a request on MT-Bench, so S and T must be timed close together), and 1 - S / T
is taken from the median of the last 12 (3 checks).

G undercounts what the head is worth.  It assumes the steps would fall where they fell; they
do not.  Measured on SmolLM2 with its EAGLE-3 head (bf16, batch 1, 128 tokens), the hybrid's
tokens a step fell, with the head skipped throughout, by 1.32x G on MT-Bench (16 questions: 1.730
to 1.467 against G 0.199) and by 2.1x on HumanEval (16 prompts: 2.517 to 2.267 against G 0.119).
So the rule credits the head with `credit` x G (1.5: between the two).  Against H / T that
kept the head where it pays on MT-Bench (1.5 G / N = 0.17 against 0.11) and skipped it on
HumanEval (0.07 against 0.10); against the timed 1 - S / T the head runs on HumanEval more
often (benchmarks/README.md, "The head gate, reworked").

While the head is skipped nothing measures G, so after `probe_every` skipped steps the head
runs for `probe_steps` + 1 steps (the first catches up); each probe that finds it still does
not pay doubles the wait, up to `probe_max` (64: a head that costs 5% of a step then costs
0.4% in probes).

The walks read the committed tokens against the trees as the hybrid proposed them, before the
speculation budget cut them: exact for greedy decoding without a budget, an estimate of what
the head could add otherwise.  The gate changes which tree is proposed, never how it is
verified, so it is lossless as every hybrid proposal is.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

from ..types import PAD, ROOT


@dataclass
class _Proposed:
    """One row's trees, as host lists, and its context length when they were proposed."""
    context: int
    lookup: dict  # (parent node, token) -> node: the lookup's tree
    head: dict  # the same for the head's tree


class HeadGate:
    def __init__(self, memory: int = 128, window: int = 32, min_steps: int = 16,
                 probe_every: int = 16, probe_max: int = 64, probe_steps: int = 4,
                 check_every: int = 32, check_max: int = 512, min_skips: int = 3,
                 credit: float = 1.5,
                 clock=time.perf_counter):
        if credit <= 0:
            raise ValueError(f"head_gate_credit must be > 0, got {credit}")
        self.keep, self.min_steps, self.credit = 1.0 - 1.0 / memory, min_steps, credit
        self.probe_every, self.probe_max, self.probe_steps = probe_every, probe_max, probe_steps
        self.check_wait, self.check_max, self.min_skips = check_every, check_max, min_skips
        self.clock = clock
        self.steps: deque = deque(maxlen=window)  # (G, N, H ms, T ms) of measured steps
        # S / T of the last 3 checks' skipped steps: checks grow rare, and S / T changes with
        # the batch
        self.skip_ratio: deque = deque(maxlen=3 * probe_steps)
        self.pair_with = 8  # the measured steps whose median T a skipped step is timed against
        self.since_check = 0  # calls that ran the head since S was last timed
        self.checking = 0  # calls the current check still skips the head for
        self._skip_start: float | None = None  # when the last call skipped the head
        self.measured = 0  # measured steps so far
        self.gained = self.committed = 0.0  # G and N over the memory
        self.wait = probe_every  # skipped steps before the next probe
        self.skipped = 0  # steps skipped since the head last ran
        self.forced = 0  # steps the current probe still runs the head for
        self.head_ran = False  # whether the last call ran the head
        self._last: tuple[float, float, dict] | None = None  # (call start, H ms, rows) to settle
        self._call_start = 0.0

    # -- each call of the hybrid ------------------------------------------------------------
    def start_call(self, row_ids: list, token_ids: list) -> None:
        """The hybrid's call begins: settle the last step's record against the tokens committed
        since.  token_ids: per row, the committed ids (a 1-D tensor or list)."""
        now = self.clock()
        if self._skip_start is not None and self.steps:
            # against the steps with the head just before it: both grow with the context and
            # swing with the batch, their ratio much less
            recent_ms = statistics.median(s[3] for s in list(self.steps)[-self.pair_with:])
            self.skip_ratio.append((now - self._skip_start) * 1e3 / recent_ms)
        self._skip_start = None
        last, self._last = self._last, None
        if last is not None:
            started, head_ms, rows = last
            gained = committed = 0
            for rid, ids in zip(row_ids, token_ids):
                tree = rows.get(rid)
                if tree is None or len(ids) <= tree.context:
                    continue
                new = _as_list(ids[tree.context:])
                # the last token committed is verification's own, never an accepted draft: a
                # walk past it follows nodes the speculation budget cut
                accepted = len(new) - 1
                by_lookup = min(_walk(tree.lookup, new), accepted)
                by_head = min(_walk(tree.head, new), accepted)
                gained += max(by_head - by_lookup, 0)
                committed += len(new)
            if committed:
                self.steps.append((gained, committed, head_ms, (now - started) * 1e3))
                self.gained = self.keep * self.gained + gained
                self.committed = self.keep * self.committed + committed
                self.measured += 1
        self._call_start = now

    def wants_head(self) -> bool:
        """Whether this call runs the head.  A host decision, from host numbers only."""
        if self.forced:
            self.forced -= 1
            return True
        if self.checking:
            self.checking -= 1
            return self._skip()
        if self.measured < self.min_steps:
            return True
        if self.pays():
            self.wait = self.probe_every
            self.since_check += 1
            if self.since_check > self.check_wait:  # time S: skip probe_steps steps
                self.since_check, self.checking = 0, self.probe_steps - 1
                self.check_wait = min(2 * self.check_wait, self.check_max)
                return self._skip()
            return True
        if self.skipped >= self.wait:  # probe: catch up, then measure probe_steps steps
            self.forced = self.probe_steps
            self.wait = min(2 * self.wait, self.probe_max)
            return True
        return self._skip()

    def _skip(self) -> bool:
        self.skipped += 1
        return False

    def ran_head(self, head_ms: float, row_ids: list, token_ids: list,
                 lookup_rows: list, head_rows: list) -> None:
        """The head ran this call, taking head_ms; lookup_rows, head_rows: per row the trees
        proposed, (tokens, parents, ...) host lists.  Measured next call if the last one ran it
        too."""
        if self.head_ran:
            rows = {rid: _Proposed(len(ids), _children(lk[0], lk[1]), _children(hd[0], hd[1]))
                    for rid, ids, lk, hd in zip(row_ids, token_ids, lookup_rows, head_rows)}
            self._last = (self._call_start, head_ms, rows)
        self.head_ran, self.skipped = True, 0

    def skipped_head(self) -> None:
        """This call did not run the head (the gate's choice or the hybrid's): its step is
        timed as S, up to the next call."""
        self.head_ran, self._skip_start = False, self._call_start

    def pays(self) -> bool:
        """credit x G / N (over the memory) > 1 - S / T (a median over the window)."""
        if len(self.skip_ratio) >= self.min_skips:
            saved = 1.0 - statistics.median(self.skip_ratio)
        else:  # S taken as T - H
            saved = (statistics.median(s[2] for s in self.steps)
                     / statistics.median(s[3] for s in self.steps))
        return self.credit * self.gained > self.committed * saved


def _children(tokens: list[int], parents: list[int]) -> dict:
    """A tree's nodes keyed by (parent node, token); PAD nodes left out."""
    return {(par, tok): j for j, (tok, par) in enumerate(zip(tokens, parents)) if tok != PAD}


def _walk(tree: dict, new: list[int]) -> int:
    """How many of the tokens `new` (committed after the tree was proposed) follow one path of
    the tree from its root: the drafts verification accepts from it."""
    node, depth = ROOT, 0
    for tok in new:
        node = tree.get((node, tok))
        if node is None:
            break
        depth += 1
    return depth


def _as_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)
