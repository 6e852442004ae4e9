"""The automatic speculation budget: how many draft tokens each row gets this step (0 allowed).

Speculation pays only while a draft token's expected gain beats its cost.  Per engine:
  cost      a verify forward carrying N tokens (every row's last token plus its drafts) takes
            t(N) = a + b * N ms, fitted online by least squares over recent steps (exponential
            forgetting), from start-up measurements where the engine can time its own forward
            (the embedded engine: engine/verify_cost.py; LinearCost.seed); drafting costs d ms
            per draft token, averaged the same way.
  gain      row r accepts its i-th draft token with probability g_r,i = f_r * c_1 * ... * c_i
            (`gains`): c_j is the engine's chance that a draft's j-th token is accepted once
            the first j - 1 were (per-depth counts, exponentially averaged), and f_r how this
            row's recent acceptance compares with the engine's (its own average, shrunk
            towards the engine's, itself shrunk towards prior_acceptance; 1 for rows without
            history).  A row always commits one token, drafted or not.
  decision  maximise committed tokens per ms, E / T with E = sum_r (1 + sum_{i<=k_r} g_r,i)
            and T = a + b * sum_r (1 + k_r) + d * sum_r k_r.  Each extra token costs the same
            (b + d) and row r's next one gains g_r,k_r+1, a non-increasing sequence, so adding
            the best remaining token while its gain / cost beats the current E / T is optimal;
            with many rows the fixed cost a is spread thin and drafting stops first.
  catch-up  a row's drafter may first have to take in tokens (its prompt, steps the budget
            skipped for it): e ms each, measured on such draftings.  Paid once but good for
            the rest of the row, it is spread over the tokens the row may still produce and
            added to the cost of drafting that row at all (`catch_up_costs`).

Why per depth: a lookup drafter's draft is a copy, and once its first tokens match the rest
tends to match too.  Measured on n-gram at batch 1 (MT-Bench 16, bf16, 128 new tokens, gamma
5): the j-th token was accepted after the first j - 1 with chance 0.31, 0.62, 0.84, 0.77,
0.81.  One rate per token (alpha ** i, alpha ~ 0.38) put the fifth token at 0.008 where it
was 0.10, so the budget cut the long drafts that n-gram gains by (tau 1.37 against 1.50
without the budget, 0.93x of its speed).

Padded verify (`verify_pads_rows`): an engine that verifies the batch as one rectangular block
(the embedded engine: every row padded to the widest row's nodes) pays for rows x (1 + widest)
tokens, whatever the other rows drafted.  Measured on SmolLM2 at batch 10 (fp32, CPU), 0.85
draft tokens per step in all raised the verify step from 225 to 300 ms: the block was twice as
wide.  There the budget picks one width w for the whole batch, maximising
E(w) / (t(rows * (1 + w)) + d * rows * w), where t(N) is what steps of N tokens took lately
(LinearCost.at; the line where N was not seen lately): a step's cost can jump past one token a
row (another matmul kernel, the tree mask), which one line through all steps cannot show.

A padded plan drafts only where it promises `draft_margin` (5%) more tokens per ms than plain
decoding: drafted steps pay for work the model leaves out (committing paths, features).  In
development runs at batch 10 (SmolLM2, fp32, 24 MT-Bench prompts, one pass each; scored
drafters then drafted in full) the hybrid's budget ran at 0.93-0.94x of plain without the
margin, 0.95x with it.

Drafter confidence: a drafter that scores its nodes (`DraftProposal.scores`, each node's path
probability: suffix, the EAGLE heads, a hybrid of the two) is planned as any drafter is
(limits_before_scoring) and cut after drafting: node gains are its scores times a
calibration factor (accepted / predicted over recent steps, so an over-confident drafter is
discounted), and the same marginal rule (or the same one-width choice, padded) keeps the best
nodes.

A drafter without scores is planned before drafting (g_r,i per token), which assumes each
row fills the width it is given.  A lookup drafter proposes nothing for a row without a match,
and in a padded block one row's long draft widens every row, so the engine cuts such proposals
again after drafting, scoring each node g_r,depth (shared among the siblings at that depth):
the width then follows the rows that actually drafted.

Exploration: a row that gets no drafts learns nothing new, so after `explore_every` steps in
which nobody drafted, one row (in turn) gets a single draft token: the estimates stay fresh at a
cost of one verify token every few steps.  Each probe that does not bring drafting back doubles
the wait (up to `explore_max`).  In a padded batch a probe widens every row, so there the first
wait is `explore_every` x rows.  The other way round, a drafter that always proposes
its whole chain feeds every verify the same token count, from which the per-token cost b cannot
be told apart from the fixed cost a; until the counts differ, every `explore_every`-th step
drafts nothing, which measures the other end of the line.

Worked example: a = 40, b = 0.5, d = 0.3, one row whose gains are 0.6 ** i (every c_j = 0.6):
E/T starts at 1 / 40.5; a first token gains 0.6 for 0.8 ms (0.75 per ms): take it (E/T =
1.6 / 41.3); the fifth gains 0.6 ** 5 = 0.078 for 0.8 ms (0.097 per ms), still above E/T =
0.054: every token up to the cap is taken.  The same row in a batch of 64 rows (T ~ 72 ms,
E ~ 64) takes a token only while 0.6 ** i / 0.8 > 0.89, i.e. never: plain decoding.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch


@dataclass
class LinearCost:
    """t(N) = a + b * N (ms), weighted least squares with forgetting factor `decay`; and, per
    token count N seen lately, the time such steps took (`at`)."""
    decay: float = 0.9
    fresh_steps: int = 64  # a count's own time is trusted while seen within this many steps
    seed_weight: float = 0.5  # a start-up measurement's weight in the fit, kept for good
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, wN, wt, wNN, wNt
    _seeds: list[float] = field(default_factory=lambda: [0.0] * 5)  # the same, never forgotten
    _seen_at: dict = field(default_factory=dict)  # N -> [ms (exponential average), step seen]
    _steps: int = 0

    def observe(self, tokens: int, ms: float) -> None:
        s = [v * self.decay for v in self._sums]
        for i, v in enumerate(_moments(tokens, ms)):
            s[i] += v
        self._sums = s
        self._steps += 1
        old = self._seen_at.get(tokens)
        self._seen_at[tokens] = [ms if old is None else 0.7 * old[0] + 0.3 * ms, self._steps]

    def seed(self, tokens: int, ms: float) -> None:
        """A measurement taken at start-up (the engine timing its own forward at several
        widths).  Online steps are forgotten, and a batch that stops drafting feeds only one
        token count, from which the per-token cost cannot be told; the seeds keep the line's
        slope known at a small, fixed weight (`seed_weight` against about 1 / (1 - decay) for
        the steps seen lately).  Each is also the count's own time for `fresh_steps` steps."""
        for i, v in enumerate(_moments(tokens, ms)):
            self._seeds[i] += self.seed_weight * v
        self._seen_at[tokens] = [ms, self._steps]

    def at(self, tokens: int) -> float:
        """The time of a step feeding `tokens`: what such steps took lately, else the line.
        The line through all steps misses a jump in cost: on SmolLM2 (fp32, CPU, batch 4) the
        steps that carried one to three draft tokens took about 1.6x a plain step (estimated
        from a development sweep's verify totals).  A count not seen for `fresh_steps` steps
        goes back to the line, so one slow step (a warm-up) does not rule its width out for
        good."""
        seen = self._seen_at.get(tokens)
        if seen is not None and self._steps - seen[1] < self.fresh_steps:
            return seen[0]
        a, b = self.coefficients()
        return a + b * tokens

    @property
    def seen(self) -> bool:
        return self._totals()[0] > 0

    @property
    def has_spread(self) -> bool:
        """Whether the steps seen fed different token counts (else b cannot be told from a)."""
        w, sn, _, snn, _ = self._totals()
        return w > 0 and snn / w - (sn / w) ** 2 > 1e-9 * max(1.0, (sn / w) ** 2)

    def _totals(self) -> list[float]:
        return [a + b for a, b in zip(self._sums, self._seeds)]

    def coefficients(self) -> tuple[float, float]:
        """(a, b): fixed and per-token ms.  Without spread in N yet, the step's whole time is
        taken as fixed cost (drafting then looks cheap, so the engine explores)."""
        w, sn, st, snn, snt = self._totals()
        if w == 0:
            return 0.0, 0.0
        var = snn / w - (sn / w) ** 2
        if not self.has_spread:
            return st / w, 0.0
        b = max(0.0, (snt / w - (sn / w) * (st / w)) / var)
        a = max(0.0, st / w - b * sn / w)
        return a, b


def _moments(tokens: int, ms: float) -> tuple[float, ...]:
    """One step's terms of the least-squares sums: 1, N, t, N^2, N t."""
    return 1.0, tokens, ms, tokens * tokens, tokens * ms


@dataclass
class SpeculationBudget:
    """One per engine.  plan() before drafting, observe_*() after the step."""
    max_tokens: int  # the drafter's configured draft length: no row gets more
    acceptance_decay: float = 0.8  # weight of a row's history against its newest step
    engine_decay: float = 0.98  # the same for the engine's (every row's steps feed it)
    row_prior_weight: float = 2.0  # a row's estimate starts as this many drafts at the engine's
    depth_prior_weight: float = 4.0  # each depth's rate starts as this many trials at the engine's
    prior_acceptance: float = 0.5  # until anything was seen
    engine_prior_weight: float = 2.0  # the engine's rate starts as this many drafts at the prior
    explore_every: int = 8  # idle steps before one row gets one probing draft token
    explore_max: int = 128  # the longest wait between probes (the wait doubles per idle probe)
    # the engine verifies rows x (1 + widest row's nodes) tokens (padding included)
    verify_pads_rows: bool = False
    verify: LinearCost = field(default_factory=LinearCost)
    draft_ms_per_token: float = 0.0
    # ms per token a drafter takes in before a row's first draft (its prompt) or after steps
    # the budget skipped for it: a hidden-state head runs its layers over each such token
    catch_up_ms_per_token: float = 0.0
    draft_margin: float = 1.05  # padded: drafts must promise this many times plain's tokens/ms
    _rows: dict = field(default_factory=dict)  # row id -> [accepted, tried] (decayed)
    _all: list = field(default_factory=lambda: [0.0, 0.0])
    # depth j (0-based) -> [accepted, tried] (decayed): drafts whose first j tokens were
    # accepted, and how many of those accepted token j + 1 too
    _depths: list = field(default_factory=list)
    _idle_steps: int = 0
    _explore_gap: int = 0  # steps to wait before the next probe (0: explore_every)
    _probe: int = 0
    _flat_steps: int = 0
    probing: bool = False  # the last plan/cut is a probe: one row, one token, kept as it is
    _calibration: list = field(default_factory=lambda: [2.0, 2.0])  # accepted, predicted

    def engine_acceptance(self) -> float:
        """The engine's per-token acceptance: its decayed counts, shrunk towards
        prior_acceptance as if `engine_prior_weight` drafts had been tried at that rate.
        Unshrunk, the first rejections set it to 0, and every gain is scaled by it: at batch 1
        (n-gram, 8 MT-Bench prompts, bf16) the budget then drafted only on probes for 350 of
        490 steps, whose single tokens found no match or were rejected (tau 1.05 against 1.31
        without the budget)."""
        acc, tried = self._all
        m = self.engine_prior_weight
        return (acc + m * self.prior_acceptance) / (tried + m)

    def acceptance(self, row_id) -> float:
        """Row row_id's per-token acceptance: its own decayed counts, shrunk towards the engine's
        (as if `row_prior_weight` more drafts had been tried at the engine's rate).  Without
        the shrinkage one rejected probe token set a row to 0, so it drafted only at the
        next probes: a hybrid at batch 1 drafted on 16% of steps (a development run, 8 MT-Bench
        prompts: tau 1.06 against 1.46 without the budget)."""
        engine = self.engine_acceptance()
        acc, tried = self._rows.get(row_id, (0.0, 0.0))
        m = self.row_prior_weight
        return min(max((acc + m * engine) / (tried + m), 0.0), 0.99)

    def gains(self, row_id) -> list[float]:
        """[max_tokens]: the chance that row row_id's i-th draft token is accepted (all before
        it accepted too), non-increasing.  The engine's per-depth rates, the first scaled by
        how the row compares with the engine (see the module docstring)."""
        engine = self.engine_acceptance()
        m = self.depth_prior_weight
        scale = self.acceptance(row_id) / engine if engine > 0 else 1.0
        out, chance = [], 1.0
        for j in range(self.max_tokens):
            acc, tried = self._depths[j] if j < len(self._depths) else (0.0, 0.0)
            rate = (acc + m * engine) / (tried + m)
            chance *= min(max(rate * scale if j == 0 else rate, 0.0), 0.99)
            out.append(chance)
        return out

    def plan(self, row_ids: list, recut: bool = False,
             backlog: list[tuple[int, int]] | None = None) -> list[int]:
        """Draft tokens per row this step, each in [0, max_tokens].  recut: the engine cuts the
        drafts again after drafting (cut(), which then counts the idle steps and probes).
        backlog[r]: (tokens row r's drafter must take in before it drafts, tokens the row may
        still produce); see catch_up_costs."""
        k = [0] * len(row_ids)
        if self.max_tokens <= 0 or not row_ids:
            return k
        a, b = self.verify.coefficients()
        step_cost = b + self.draft_ms_per_token
        if not self.verify.seen or (step_cost <= 0 and not self.verify.has_spread):
            # nothing measured yet: one draft token a row, the cheapest step that shows what a
            # drafted step costs.  Drafting the whole width here made the first three steps
            # full-width ones (gamma 5 at batch 32: six times a plain step's tokens), a tenth
            # of a 32-step batch (MT-Bench 32, bf16: the budget's arms at 0.83-0.88x of plain)
            return [min(1, self.max_tokens)] * len(row_ids)
        if step_cost <= 0:
            # steps of several widths measured, and drafts cost nothing more: every row gets
            # the whole width (this read as "nothing measured" once start-up timings of a flat
            # cost fitted a slope of 0)
            return [self.max_tokens] * len(row_ids)
        if not self.verify.has_spread:
            # every step so far fed the same token count, so a verify token's cost is unknown
            # and would read as free: on the first such step, and every explore_every steps,
            # one step without drafts measures the other end (the sooner the line is known,
            # the fewer steps pay for drafts that do not pay)
            self._flat_steps += 1
            if self._flat_steps == 1 or self._flat_steps % self.explore_every == 0:
                return k
        gains = [self.gains(r) for r in row_ids]
        once = self.catch_up_costs(backlog, len(row_ids))
        if self.verify_pads_rows:
            # every row with a chance is drafted at width w, so each pays its catch-up
            w = self._best_width(gains, self.draft_ms_per_token,
                                 sum(c for c, g in zip(once, gains) if g[0] > 0))
            k = [w if g[0] > 0 else 0 for g in gains]
        else:
            k = self._best_tokens(gains, a, b, step_cost, once)
        if recut and any(k):
            self.probing = False  # a real plan: the cut after drafting weighs it
            return k
        return self._probe_when_idle(k, [1] * len(k))

    def catch_up_costs(self, backlog: list[tuple[int, int]] | None, rows: int) -> list[float]:
        """Per row, the ms a step pays for drafting it at all: catching its drafter up on
        `taken_in` tokens, paid once but good for the rest of the row, so spread over the
        `left` tokens it may still produce (at most one step each).

        Why: a hybrid's EAGLE head first runs over every prompt it drafts for.  At batch 32
        (MT-Bench, bf16, 32 new tokens) one first step drafted three tokens a row and its head
        took in the 32 prompts for 426 ms, five plain steps, which the rest of the batch never
        won back (0.94x of plain).  Charged whole to one step instead, a long prompt's row would
        never draft: its backlog only grows while it waits."""
        if not backlog or self.catch_up_ms_per_token <= 0:
            return [0.0] * rows
        return [self.catch_up_ms_per_token * taken_in / max(1, left)
                for taken_in, left in backlog]

    def limits_before_scoring(self, row_ids: list,
                              backlog: list[tuple[int, int]] | None = None) -> list[int]:
        """For a drafter that scores its nodes: each row's draft length, planned as plan() plans
        any drafter's (each row's acceptance of what the cut kept lately, the drafting time
        per token); cut() then keeps the best-scored nodes of what was drafted.  Drafting
        every row in full and cutting afterwards (session 11's rule, where drafting stopped
        only when not even certain drafts could pay) paid for drafts the cut threw away: a
        hybrid at batch 10 drafted every step (1.26 s of an 11.8 s run, 0.87x of plain)."""
        a, b = self.verify.coefficients()
        if not row_ids or not self.verify.has_spread or b <= 0:
            return [self.max_tokens] * len(row_ids)  # cut() explores
        return self.plan(row_ids, recut=True, backlog=backlog)

    def cut_scored(self, scores: torch.Tensor, real: torch.Tensor, cut: bool = True,
                   calibrate: bool = True, caps: list[int] | None = None
                   ) -> tuple[list[int], float]:
        """One call for every engine holding a scored proposal.  scores, real [batch, nodes]:
        each node's path probability, and which nodes are real (not padding).  Returns how many
        of each row's best nodes to keep, and their scores summed (what observe_scores later
        calibrates against).  cut=False keeps every node (a probe), at most caps[r] of row r."""
        # the budget decides on the host: one copy of the scores, best first per row
        ranked = scores.masked_fill(~real, -1.0).sort(dim=1, descending=True).values
        rows = [[p for p in row if p >= 0] for row in ranked.tolist()]
        if cut:
            counts = self.cut(rows, calibrate)
        else:
            caps = caps if caps is not None else [len(row) for row in rows]
            counts = [min(len(row), cap) for row, cap in zip(rows, caps)]
        return counts, sum(sum(row[:k]) for row, k in zip(rows, counts))

    def cut(self, scores: list[list[float]], calibrate: bool = True) -> list[int]:
        """After drafting: how many of each row's nodes to keep, best first.  scores: per row,
        the drafter's path probability of each node it proposed, best first.  Drafting is done,
        so only verify cost counts against them.  calibrate=False: the scores come from the
        rows' own measured acceptance (a drafter without scores), so they need no discount."""
        if not scores:
            return []
        a, b = self.verify.coefficients()
        if not self.verify.has_spread:
            # a token's verify cost is not known yet: explore cheaply, one node per row on
            # every other step and none in between, so the steps differ in width
            self._flat_steps += 1
            return [min(1, len(s)) if self._flat_steps % 2 else 0 for s in scores]
        if b <= 0:
            return [len(s) for s in scores]  # verify tokens measured as free: keep everything
        scale = self.calibration() if calibrate else 1.0
        gains = [[scale * p for p in s] for s in scores]
        if self.verify_pads_rows:
            w = self._best_width(gains, 0.0)
            k = [min(w, len(s)) for s in scores]
        else:
            k = self._best_tokens(gains, a, b, b)
        return self._probe_when_idle(k, [len(s) for s in scores])

    def calibration(self) -> float:
        """Accepted over predicted drafts, recent steps weighted most (prior: 1)."""
        accepted, predicted = self._calibration
        return min(max(accepted / predicted, 0.05), 2.0)

    def _best_tokens(self, gains: list[list[float]], a: float, b: float,
                     step_cost: float, once: list[float] | None = None) -> list[int]:
        """Rows verified ragged: add the best remaining token (each costs step_cost, a row's
        first also once[r]) while its gain per ms beats the step's tokens per ms.
        gains[r][i]: row r's (i+1)-th token, non-increasing along i."""
        once = once or [0.0] * len(gains)
        k = [0] * len(gains)
        gain = float(len(gains))
        time = a + b * len(gains)
        # ranked by gain per ms: a row's first token carries its catch-up too
        best = [(-g[0] / (step_cost + once[i]), i) for i, g in enumerate(gains) if g and g[0] > 0]
        heapq.heapify(best)
        while best:
            neg_rate, i = heapq.heappop(best)
            cost = step_cost + (once[i] if k[i] == 0 else 0.0)
            if -neg_rate <= gain / time:
                break  # the best remaining token no longer raises tokens per ms
            k[i] += 1
            gain, time = gain + gains[i][k[i] - 1], time + cost
            if k[i] < len(gains[i]):
                heapq.heappush(best, (-gains[i][k[i]] / step_cost, i))
        return k

    def _best_width(self, gains: list[list[float]], d: float, once: float = 0.0) -> int:
        """Rows verified as one padded block: the width w (draft tokens per row) that maximises
        tokens per ms, each row gaining its first w gains; any w > 0 also pays `once` (the
        rows' catch-up, catch_up_costs).  A block's time is what blocks of its size took
        lately (LinearCost.at), so a jump in cost past one token a row counts."""
        rows = len(gains)
        gain, best_w = float(rows), 0
        plain = self.verify.at(rows)
        # drafting must beat plain decoding by a margin: a drafted step also pays for what the
        # model leaves out (committing accepted paths, feature bookkeeping)
        best_rate = self.draft_margin * gain / plain if plain > 0 else 0.0
        for w in range(1, max(len(g) for g in gains) + 1):
            gain += sum(g[w - 1] for g in gains if len(g) >= w)
            time = self.verify.at(rows * (1 + w)) + d * rows * w + once
            rate = gain / time if time > 0 else float("inf")
            if rate > best_rate:
                best_w, best_rate = w, rate
        return best_w

    def _probe_when_idle(self, k: list[int], room: list[int]) -> list[int]:
        """Nobody drafting for a while: one row (in turn, among those with room) gets one
        token, and each probe that changes nothing doubles the wait for the next."""
        self.probing = False
        if any(k):
            self._idle_steps, self._explore_gap = 0, 0
            return k
        self._idle_steps += 1
        # in a padded block a probe widens every row: it comes as many times less often
        first_gap = self.explore_every * (len(k) if self.verify_pads_rows else 1)
        gap = self._explore_gap or min(first_gap, self.explore_max)
        rows = [i for i, n in enumerate(room) if n > 0]
        if self._idle_steps >= gap and rows:
            self._idle_steps = 0
            self._explore_gap = min(2 * gap, self.explore_max)
            self._probe = (self._probe + 1) % len(rows)
            k[rows[self._probe]] = 1
            self.probing = True
        return k

    def fed_tokens(self, nodes: list[int]) -> int:
        """Tokens a verify forward pays for: every row's last token and its nodes (each row
        padded to the widest, when the engine pads)."""
        if self.verify_pads_rows:
            return len(nodes) * (1 + max(nodes, default=0))
        return len(nodes) + sum(nodes)

    def observe_verify(self, tokens: int, ms: float) -> None:
        """One verify forward: `tokens` fed in all (rows + drafts), `ms` it took."""
        self.verify.observe(tokens, ms)

    def observe_draft(self, tokens: int, ms: float) -> None:
        """Drafting time of a step that proposed `tokens` (engines skip a batch's first step,
        whose drafting also takes in the prompts)."""
        if tokens > 0:
            per = ms / tokens
            self.draft_ms_per_token = (per if self.draft_ms_per_token == 0.0
                                       else 0.8 * self.draft_ms_per_token + 0.2 * per)

    def observe_drafting(self, drafted: int, ms: float, taken_in: int = 0) -> None:
        """One drafting's time, as every engine reports it: the cost of its `drafted` tokens,
        or, where it also took in `taken_in` backlog tokens, their catch-up (its time less
        what the draft tokens cost at the current rate)."""
        if taken_in:
            self.observe_catch_up(taken_in, ms - self.draft_ms_per_token * drafted)
        else:
            self.observe_draft(drafted, ms)

    def observe_catch_up(self, tokens: int, ms: float) -> None:
        """A drafting that took in `tokens` backlog tokens (prompts, skipped steps) and spent
        `ms` on them beyond its draft tokens' own cost (engines pass the drafting time less
        draft_ms_per_token times the tokens drafted)."""
        if tokens > 0:
            per = max(ms, 0.0) / tokens
            self.catch_up_ms_per_token = (per if self.catch_up_ms_per_token == 0.0
                                          else 0.8 * self.catch_up_ms_per_token + 0.2 * per)

    def observe_row(self, row_id, drafted: int, accepted: int, depth: int | None = None
                    ) -> None:
        """A row's verify step: the drafts it tried (the first rejection ends the trial) and
        how many were accepted.  depth: its draft's longest path (a tree's is shorter than its
        node count; None: a chain, as long as `drafted`)."""
        if drafted <= 0:
            return
        depth = drafted if depth is None else depth
        tried = min(drafted, accepted + 1)
        for stats, decay in ((self._rows.setdefault(row_id, [0.0, 0.0]), self.acceptance_decay),
                             (self._all, self.engine_decay)):
            stats[0] = stats[0] * decay + accepted
            stats[1] = stats[1] * decay + tried
        while len(self._depths) < min(depth, self.max_tokens):
            self._depths.append([0.0, 0.0])
        for j, stats in enumerate(self._depths):
            stats[0] *= self.engine_decay
            stats[1] *= self.engine_decay
            if j < min(depth, accepted + 1):  # token j + 1 was tried: all before it accepted
                stats[0] += j < accepted
                stats[1] += 1

    def observe_scores(self, predicted: float, accepted: int) -> None:
        """A step's scored nodes: the sum of their scores, and how many were accepted."""
        if predicted > 0:
            c = self._calibration
            c[0], c[1] = 0.9 * c[0] + accepted, 0.9 * c[1] + predicted

    def forget(self, row_ids: list) -> None:
        for r in row_ids:
            self._rows.pop(r, None)


class StepBudget:
    """The budget for an engine that calls the drafter once per decoding step and says only what
    each row committed (vLLM's custom_class proposer, SGLang's worker): the time from the end of
    one call to the start of the next is the target's verify step for the tokens handed out.

        limits = steps.begin(row_ids, committed)   # committed: tokens each row got this step
        ... draft rows with limits[i] > 0, cut each to limits[i] ...
        steps.end(row_ids, drafted)                # drafted: tokens handed to the engine per row

    A step in which a row arrived (its prompt ran in that forward) is not timed: prefill would
    read as verify cost.  clock: seconds, injectable for tests."""

    def __init__(self, budget: SpeculationBudget, clock=None):
        import time
        self.budget = budget
        self.clock = clock or time.perf_counter
        self._drafted: dict = {}  # row id -> tokens handed out at the last call
        self._fed = 0  # tokens the last step verified: one per row + its drafts
        self._predicted = 0.0  # the scores of the drafts handed out at the last call, summed
        self._end: float | None = None
        self._start = 0.0

    def begin(self, row_ids: list, committed: list[int], scored: bool = False,
              backlog: list[tuple[int, int]] | None = None) -> list[int]:
        """scored: the drafter scores its nodes, so rows draft in full now (or nobody does,
        see limits_before_scoring) and budget.cut() keeps the best after drafting.
        backlog[r]: (tokens row r's drafter must take in beyond this step's, tokens the row may
        still produce), which prices its catch-up (SpeculationBudget.catch_up_costs)."""
        now = self.clock()
        known = all(r in self._drafted for r in row_ids)
        if self._end is not None and known and self._fed:
            self.budget.observe_verify(self._fed, (now - self._end) * 1e3)
        accepted = 0
        for r, n in zip(row_ids, committed):
            if self._drafted.get(r):
                self.budget.observe_row(r, self._drafted[r], max(0, n - 1))
                accepted += min(max(0, n - 1), self._drafted[r])
        self.budget.observe_scores(self._predicted, accepted)
        self._predicted = 0.0
        self._start = now
        if scored:
            return self.budget.limits_before_scoring(list(row_ids), backlog)
        return self.budget.plan(list(row_ids), backlog=backlog)

    def forget(self, row_ids: list) -> None:
        """Rows that left the engine: their acceptance history goes with them."""
        self.budget.forget(row_ids)

    def end(self, row_ids: list, drafted: list[int], predicted: float = 0.0,
            taken_in: int = 0) -> None:
        """drafted: tokens handed out per row; predicted: their scores summed (scored drafts).
        taken_in: tokens this drafting also fed its rows (prompts, steps the budget skipped for
        them) beyond what the step committed: that time is their catch-up, not the cost of
        the draft tokens (as in the embedded engine)."""
        now = self.clock()
        self.budget.observe_drafting(sum(drafted), (now - self._start) * 1e3, taken_in)
        self._drafted = dict(zip(row_ids, drafted))
        self._fed = self.budget.fed_tokens(drafted)
        self._predicted = predicted
        self._end = now
