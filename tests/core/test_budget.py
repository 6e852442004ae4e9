"""The speculation budget: its cost fit, its choice against brute force, and the embedded engine
with it on (greedy identity, drafting stops when verify is made expensive)."""
from __future__ import annotations

import itertools
import time

import pytest

from specplug.budget import LinearCost, SpeculationBudget
from specplug.drafters.draft_model import DraftModelDrafter
from specplug.drafters.ngram import NgramDrafter
from specplug.drafters.suffix import SuffixDrafter, SuffixOptions
from specplug.engine import embedded
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.tiny import build_tiny_llama, perturbed_copy


def test_linear_cost_recovers_fixed_and_per_token_time():
    cost = LinearCost(decay=0.95)
    assert cost.coefficients() == (0.0, 0.0)
    cost.observe(4, 12.0)
    assert cost.coefficients() == (12.0, 0.0)  # one N only: all of it counts as fixed
    for n in (1, 5, 9, 2, 30, 7):
        cost.observe(n, 10.0 + 0.5 * n)
    a, b = cost.coefficients()
    assert a == pytest.approx(10.0, abs=0.2) and b == pytest.approx(0.5, abs=0.02)


def budget_with(a, b, d, alphas, max_tokens=4):
    plan = SpeculationBudget(max_tokens)
    plan.verify.observe(1, a + b)
    plan.verify.observe(101, a + 101 * b)
    plan.draft_ms_per_token = d
    for row, alpha in alphas.items():  # rows whose histories give exactly these rates
        plan._rows[row] = [alpha * 1000, 1000.0]
    return plan


def rate(k, gains, a, b, d):
    gain = sum(1 + sum(g[:n]) for n, g in zip(k, gains))
    return gain / (a + b * sum(1 + n for n in k) + d * sum(k))


@pytest.mark.parametrize("a,b,d,alphas", [
    (40.0, 0.5, 0.3, [0.6]), (40.0, 0.5, 0.3, [0.6] * 64), (5.0, 2.0, 0.5, [0.9, 0.2]),
    (20.0, 1.0, 0.0, [0.8, 0.5, 0.05]), (2.0, 3.0, 1.0, [0.95, 0.95]), (30.0, 0.2, 4.0, [0.7])])
def test_plan_maximises_tokens_per_ms_like_brute_force(a, b, d, alphas):
    plan = budget_with(a, b, d, dict(enumerate(alphas)))
    gains = [plan.gains(r) for r in range(len(alphas))]
    got = plan.plan(list(range(len(alphas))))
    if len(alphas) <= 3:
        best = max(itertools.product(range(5), repeat=len(alphas)),
                   key=lambda k: rate(k, gains, a, b, d))
        assert rate(got, gains, a, b, d) == pytest.approx(rate(best, gains, a, b, d))
    if len(alphas) == 64:  # the docstring's example: under load, plain decoding
        assert got == [0] * 64
    if alphas == [0.6] and d == 0.3:
        assert got == [4]


def test_unmeasured_engine_explores_and_rows_without_history_take_the_average():
    plan = SpeculationBudget(3)
    assert plan.plan([1, 2]) == [1, 1]  # the cheapest drafted step: one token a row
    plan.observe_row(1, drafted=3, accepted=3)
    plan.observe_row(1, drafted=3, accepted=0)
    # every row's history, slowly forgotten, shrunk towards the prior 0.5 as if 2 more drafts
    engine = (3 * 0.98 + 0 + 2 * 0.5) / (3 * 0.98 + 1 + 2)
    assert plan.acceptance(7) == pytest.approx(engine)  # a row without history: the engine's
    # a row's own counts, shrunk towards the engine's as if 2 more drafts were tried at its rate
    assert plan.acceptance(1) == pytest.approx((3 * 0.8 + 2 * engine) / (3 * 0.8 + 1 + 2))
    plan.observe_row(2, drafted=1, accepted=0)  # one rejected probe token does not zero a row
    engine = (3 * 0.98 ** 2 + 2 * 0.5) / ((3 * 0.98 + 1) * 0.98 + 1 + 2)
    assert plan.acceptance(2) == pytest.approx((0 + 2 * engine) / (1 + 2))
    # nor do an engine's first rejections zero every row: its rate is shrunk towards the prior
    fresh = SpeculationBudget(3)
    for _ in range(3):
        fresh.observe_row(0, drafted=1, accepted=0)
    assert fresh.engine_acceptance() == pytest.approx(1.0 / (0.98 ** 2 + 0.98 + 1 + 2))
    assert fresh.gains(5)[0] > 0.1  # unshrunk: 0, and no row would draft again but on probes
    plan.forget([1])
    assert 1 not in plan._rows


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_llama(0)
    base = [10, 20, 30, 40, 10, 20, 30, 40, 50]
    reqs = [Request(base, 24), Request([7, 8, 9, 7, 8, 9], 24), Request(base[:5], 24),
            Request([3, 4, 5, 6], 24)]
    plain = [o.output_token_ids for o in EmbeddedEngine(model, None, None).generate(reqs, 4)[0]]
    return model, reqs, plain


def _drafter(which, model):
    if which == "ngram":
        return NgramDrafter()
    if which == "suffix-tree":  # scores its nodes: cut after drafting, trees narrowed
        return SuffixDrafter(SuffixOptions(tree_nodes=6))
    return DraftModelDrafter(perturbed_copy(model, 0.1), 256)


def _fixed_cheap_costs(budget: SpeculationBudget) -> SpeculationBudget:
    """Costs at which drafting pays (a step 100 ms + 1 ms a token; drafting and a drafter's
    catch-up free), never updated.  Measured on the tiny target, timing noise decides whether
    the budget drafts at all (in CI, beside a second pytest process, one run never did)."""
    for tokens in (1, 101):
        budget.verify.observe(tokens, 100.0 + tokens)
    budget.observe_verify = budget.observe_draft = budget.observe_catch_up = (
        lambda tokens, ms: None)
    budget.verify.seed = lambda tokens, ms: None  # nor timed at start-up
    return budget


@pytest.mark.parametrize("which", ["ngram", "draft", "suffix-tree"])
@pytest.mark.parametrize("pads", [False, True])
def test_greedy_identity_with_the_budget_on(tiny, which, pads):
    model, reqs, plain = tiny
    budget = _fixed_cheap_costs(SpeculationBudget(4, verify_pads_rows=pads))
    engine = EmbeddedEngine(model, None, _drafter(which, model), 4, budget=budget)
    outs, stats = engine.generate(reqs, batch_size=4)
    assert [o.output_token_ids for o in outs] == plain
    assert stats.num_accepted_tokens > 0 and len(stats.budgets) > 0
    assert "budget_histogram" in stats.summary()


def _online_only(monkeypatch):
    """The engine's budget learns its costs from the steps alone (no start-up measurement)."""
    monkeypatch.setattr(embedded, "measure_verify_costs", lambda *args: {})


@pytest.mark.parametrize("at_start", [True, False])
@pytest.mark.parametrize("which", ["draft", "suffix-tree"])
def test_expensive_verify_makes_the_budget_draft_nothing(tiny, monkeypatch, which, at_start):
    """A forward costs 10 ms more per row and 25 ms more per token past each row's first:
    a draft token costs more than a plain step makes, so even a certain one cannot pay.
    Measured at start-up, the budget drafts nothing from the first step; learnt online only,
    it stops after the first measured steps (bar one probing token now and then).  The
    output stays the target's."""
    model, reqs, plain = tiny
    forward = EmbeddedEngine._forward
    pads = which != "draft"
    budget = SpeculationBudget(4, verify_pads_rows=pads)

    def slow(self, cache, ids, *args, **kwargs):
        rows, fed = ids.shape[0], ids.numel()  # padding included
        time.sleep(0.01 * rows + 0.025 * (fed - rows))
        return forward(self, cache, ids, *args, **kwargs)

    monkeypatch.setattr(embedded.EmbeddedEngine, "_forward", slow)
    if not at_start:
        _online_only(monkeypatch)
    engine = EmbeddedEngine(model, None, _drafter(which, model), 4, budget=budget)
    outs, stats = engine.generate(reqs, batch_size=4)
    assert [o.output_token_ids for o in outs] == plain
    if at_start:
        assert sum(stats.budgets) <= len(stats.budgets) / 4, stats.budgets
        # nothing until the first probe (after explore_every idle steps)
        assert max(stats.budgets) <= 1 and stats.budgets[:7] == [0] * 7, stats.budgets
        return
    if which == "draft":
        assert stats.budgets[0] == 4  # nothing measured: one token a row explores
    later = stats.budgets[4:]  # after a few measured steps: nothing but the odd probing token
    assert later and max(later) <= 1 and sum(later) <= len(later) / 4, stats.budgets


def test_cheap_verify_measured_at_start_drafts_from_the_first_step(tiny, monkeypatch):
    """A forward costs 30 ms at every width (the tiny target's own millisecond would leave the
    choice to timing noise): measured at start-up, the budget drafts every row the whole width
    at once (without the measurement its first steps explore with one token a row, then
    none)."""
    model, reqs, plain = tiny
    forward = EmbeddedEngine._forward

    def flat(self, *args, **kwargs):
        time.sleep(0.03)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(embedded.EmbeddedEngine, "_forward", flat)
    budget = SpeculationBudget(4, verify_pads_rows=True, prior_acceptance=0.9)
    engine = EmbeddedEngine(model, None, _drafter("draft", model), 4, budget=budget)
    outs, stats = engine.generate(reqs, batch_size=4)
    assert [o.output_token_ids for o in outs] == plain
    assert budget.verify.has_spread and stats.budgets[0] == 16, stats.budgets
    assert {4, 8, 12, 16, 20} <= set(budget.verify._seen_at)  # 4 rows x (1 + 0..4)


def test_costs_are_measured_over_the_widest_prompt_of_the_first_batch(tiny, monkeypatch):
    """Every row of a batch attends the whole padded width, so the start-up timing runs over
    the longest prompt among the first batch's rows (with the median prompt, MT-Bench at
    batch 32 measured a 5-token block 20% below what such steps took), at that batch size."""
    model, reqs, _ = tiny
    seen = []
    monkeypatch.setattr(embedded, "measure_verify_costs",
                        lambda forward, device, rows, context, drafts: seen.append(
                            (rows, context, drafts)) or {})
    lengths = [3, 9, 4, 30, 5]  # the 30-token prompt is past the first batch of 3
    prompts = [[1 + i % 7] * n for i, n in enumerate(lengths)]
    engine = EmbeddedEngine(model, None, _drafter("draft", model), 4,
                            budget=SpeculationBudget(4, verify_pads_rows=True))
    engine.generate([type(reqs[0])(p, 2) for p in prompts], batch_size=3)
    assert seen == [(3, 9, 4)]


def test_expensive_committing_counts_as_the_steps_cost(tiny, monkeypatch):
    """Verify is as fast as ever but committing costs 40 ms per fed token: the budget times the
    whole step past drafting, so it stops drafting as it does for an expensive verify (timing
    the forward alone, it went on drafting 4 tokens a step)."""
    model, reqs, plain = tiny
    commit = EmbeddedEngine._commit
    budget = SpeculationBudget(4, verify_pads_rows=True)

    def slow(self, rows, cache, proposal, result, feats, stats):
        time.sleep(0.04 * budget.fed_tokens(proposal.num_nodes.tolist()))
        return commit(self, rows, cache, proposal, result, feats, stats)

    monkeypatch.setattr(embedded.EmbeddedEngine, "_commit", slow)
    _online_only(monkeypatch)  # what this times is the steps' own cost
    engine = EmbeddedEngine(model, None, _drafter("draft", model), 4, budget=budget)
    outs, stats = engine.generate(reqs, batch_size=4)
    assert [o.output_token_ids for o in outs] == plain
    later = stats.budgets[4:]
    assert later and max(later) <= 1 and sum(later) <= len(later) / 4, stats.budgets


class _Clock:
    """A fake clock the test advances by hand (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run_steps(steps, clock, rows, verify_ms, draft_ms_per_token, accept, n_steps=40):
    """Drive a StepBudget the way an engine adapter does; returns the limits of the last step."""
    committed = [1] * len(rows)
    limits = []
    for _ in range(n_steps):
        limits = steps.begin(rows, committed)
        clock.now += draft_ms_per_token * sum(limits) / 1e3
        steps.end(rows, limits)
        clock.now += verify_ms(len(rows) + sum(limits)) / 1e3
        committed = [1 + accept(k) for k in limits]
    return limits


def test_a_fresh_budget_explores_with_one_token_a_row_then_a_plain_step():
    """At batch 32 a full-width first step feeds six times a plain step's tokens: a fresh
    budget drafts one token a row, and the next step (still one token count seen) none, so the
    cost line is known after two cheap steps."""
    plan = SpeculationBudget(5, verify_pads_rows=True, prior_acceptance=0.9)
    rows = list(range(32))
    assert plan.plan(rows) == [1] * 32
    plan.observe_verify(64, 300.0)
    plan.observe_draft(32, 3.0)
    assert plan.plan(rows) == [0] * 32  # the other end of the line
    plan.observe_verify(32, 200.0)
    assert plan.verify.has_spread


def test_step_budget_times_the_gap_between_calls_as_verify():
    from specplug.budget import StepBudget
    # cheap per-token verify and every draft accepted: every row gets the whole budget
    clock = _Clock()
    steps = StepBudget(SpeculationBudget(4), clock)
    got = _run_steps(steps, clock, [0, 1], lambda n: 50.0 + 0.5 * n, 0.1, lambda k: k)
    assert got == [4, 4]
    # every step fed 2 rows + 8 drafts: the fit reproduces that step's time
    a, b = steps.budget.verify.coefficients()
    assert a + 10 * b == pytest.approx(50.0 + 0.5 * 10)
    # verify made expensive per token (each draft costs what a whole step saves): no drafts,
    # except the budget's occasional one-token probe
    clock = _Clock()
    steps = StepBudget(SpeculationBudget(4), clock)
    last = _run_steps(steps, clock, [0, 1], lambda n: 5.0 + 40.0 * n, 0.1, lambda k: k // 2,
                      n_steps=60)
    assert sum(last) <= 1


def test_step_budget_skips_timing_a_step_that_took_in_a_new_row():
    from specplug.budget import StepBudget
    clock = _Clock()
    steps = StepBudget(SpeculationBudget(4), clock)
    steps.begin([0], [1])
    steps.end([0], [2])
    clock.now += 1.0  # a new row's prefill ran in this step: 1000 ms must not count as verify
    steps.begin([0, 1], [3, 1])
    assert not steps.budget.verify.seen
    steps.end([0, 1], [2, 2])
    clock.now += 0.02
    steps.begin([0, 1], [1, 1])
    assert steps.budget.verify.coefficients()[0] == pytest.approx(20.0)


def test_step_budget_prices_a_rows_catch_up():
    """vLLM's and SGLang's adapters as the embedded engine: a drafting that took in a prompt (or
    skipped steps) teaches the catch-up cost, not the draft tokens', and a row whose catch-up
    the rest of it cannot win back is not drafted."""
    from specplug.budget import StepBudget
    clock = _Clock()
    steps = StepBudget(SpeculationBudget(4), clock)
    steps.begin([0], [1])
    clock.now += 0.5  # 500 ms: a head taking in a 100-token prompt
    steps.end([0], [2], taken_in=100)
    assert steps.budget.catch_up_ms_per_token == pytest.approx(5.0)
    assert steps.budget.draft_ms_per_token == 0.0
    # the same engine later: cheap verify, every draft accepted, so both rows draft in full...
    clock = _Clock()
    steps = StepBudget(SpeculationBudget(4), clock)
    assert _run_steps(steps, clock, [0, 1], lambda n: 50.0 + 0.5 * n, 0.1, lambda k: k) == [4, 4]
    steps.budget.catch_up_ms_per_token = 5.0
    # ...except a row 1000 tokens behind with 2 left: 2500 ms a token to catch it up
    assert steps.begin([0, 1], [5, 5], backlog=[(0, 100), (1000, 2)]) == [4, 0]


def padded_rate(w, gains, a, b, d):
    gain = sum(1 + sum(g[:w]) for g in gains)
    return gain / (a + b * len(gains) * (1 + w) + d * len(gains) * w)


@pytest.mark.parametrize("a,b,d,alphas", [
    (40.0, 0.5, 0.3, [0.6]), (200.0, 9.0, 0.1, [0.3] * 10), (200.0, 9.0, 0.1, [0.95] * 10),
    (30.0, 2.0, 0.0, [0.9, 0.1, 0.5]), (5.0, 5.0, 1.0, [0.99, 0.99])])
def test_padded_plan_picks_the_best_common_width(a, b, d, alphas):
    """An engine that pads every row to the widest pays rows x (1 + w): one width for all."""
    plan = budget_with(a, b, d, dict(enumerate(alphas)))
    plan.verify_pads_rows = True
    gains = [plan.gains(r) for r in range(len(alphas))]
    got = plan.plan(list(range(len(alphas))))
    assert len(set(got)) == 1
    best = max(range(5), key=lambda w: padded_rate(w, gains, a, b, d))
    assert padded_rate(got[0], gains, a, b, d) == pytest.approx(padded_rate(best, gains, a, b, d))
    if alphas == [0.3] * 10:  # SmolLM2 at batch 10 on a CPU: doubling the block does not pay
        assert got == [0] * 10


def test_fed_tokens_count_the_padding_when_the_engine_pads():
    assert SpeculationBudget(4).fed_tokens([0, 3, 1]) == 3 + 4
    assert SpeculationBudget(4, verify_pads_rows=True).fed_tokens([0, 3, 1]) == 3 * 4


def scored_rate(k, scores, a, b):
    gain = len(scores) + sum(sum(s[:n]) for s, n in zip(scores, k))
    return gain / (a + b * (len(scores) + sum(k)))


@pytest.mark.parametrize("a,b,scores", [
    (40.0, 0.5, [[0.9, 0.8, 0.3, 0.01]]), (20.0, 2.0, [[0.95, 0.9], [0.2, 0.1], [0.6]]),
    (5.0, 4.0, [[0.99, 0.5], [0.3]])])
def test_cut_keeps_the_scored_nodes_that_pay_like_brute_force(a, b, scores):
    plan = budget_with(a, b, 0.0, {})
    got = plan.cut(scores)
    best = max(itertools.product(*[range(len(s) + 1) for s in scores]),
               key=lambda k: scored_rate(k, scores, a, b))
    assert scored_rate(got, scores, a, b) == pytest.approx(scored_rate(best, scores, a, b))


def test_cut_keeps_everything_when_verify_tokens_measure_free():
    plan = SpeculationBudget(4)
    for n in (1, 5, 9):  # the same time whatever the tokens: b fits to 0
        plan.verify.observe(n, 30.0)
    assert plan.verify.coefficients() == (pytest.approx(30.0), 0.0)
    assert plan.cut([[0.9, 0.1], [0.05]]) == [2, 1]


def test_cut_discounts_an_over_confident_drafter():
    plan = budget_with(20.0, 2.0, 0.0, {})
    scores = [[0.9, 0.8, 0.7]]
    assert plan.cut(scores) == [3]
    for _ in range(30):  # it promised 2.4 tokens a step and delivered 0.2
        plan.observe_scores(2.4, 0)
        plan.observe_scores(2.4, 1) if _ % 6 == 0 else None
    assert plan.calibration() < 0.2
    assert plan.cut(scores) == [0]


def test_cut_scored_ranks_real_nodes_and_sums_what_it_keeps():
    """The tensor entry every engine calls: padding never counts, a row's nodes are ranked best
    first whatever their order, the kept scores are summed; cut=False keeps all up to caps."""
    import torch
    plan = budget_with(20.0, 2.0, 0.0, {})
    scores = torch.tensor([[0.2, 0.9, 0.5], [0.95, 0.99, 0.0]])
    real = torch.tensor([[True, True, True], [True, True, False]])
    kept, predicted = plan.cut_scored(scores, real)
    assert kept == plan.cut([[0.9, 0.5, 0.2], [0.99, 0.95]])
    assert predicted == pytest.approx(sum([0.9, 0.5, 0.2][:kept[0]] + [0.99, 0.95][:kept[1]]))
    assert plan.cut_scored(scores, real, cut=False) == ([3, 2], pytest.approx(3.54))
    assert plan.cut_scored(scores, real, cut=False, caps=[1, 5]) == ([1, 2], pytest.approx(2.84))


def test_cut_in_a_padded_engine_keeps_one_width_and_probes_when_idle():
    plan = budget_with(200.0, 9.0, 0.0, {})
    plan.verify_pads_rows, plan.explore_every = True, 2
    scores = [[0.3, 0.2]] * 10  # SmolLM2 at batch 10: 10 more tokens gain 3, cost 90 of 290 ms
    got = [plan.cut(scores) for _ in range(20 + 40)]
    probes = [i for i, k in enumerate(got) if sum(k)]
    # a probe widens all 10 rows, so the first comes after 2 x 10 idle steps, the next after 40
    assert probes == [19, 59]
    assert all(sorted(got[i]) == [0] * 9 + [1] for i in probes)
    sure = [[0.99, 0.98]] * 10  # every row's next two tokens are near-certain: worth the width
    assert plan.cut(sure) == [2] * 10


def test_acceptance_scores_follow_depth_split_among_siblings_and_never_pass_a_parent():
    import torch

    from specplug.types import PAD, DraftProposal
    chain = DraftProposal.chain(torch.tensor([[5, 6, 7], [8, PAD, PAD]]))
    got = embedded.acceptance_scores(chain, [[0.5, 0.25, 0.125], [0.9, 0.6, 0.5]])
    assert got.flatten().tolist() == pytest.approx([0.5, 0.25, 0.125, 0.9, 0.0, 0.0])
    # a root with two children, the second with one child: depth 1 splits 0.8 in two, and the
    # grandchild's 0.64 is capped at its parent's 0.4
    tree = DraftProposal(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, -1, 1]]))
    assert embedded.acceptance_scores(tree, [[0.8, 0.64]])[0].tolist() == pytest.approx(
        [0.4, 0.4, 0.4])


class _BlindPlan(SpeculationBudget):
    """Plans every row the whole width (as a plan before drafting does when the rows' acceptance
    looks good) from fixed costs: verify 100 ms + 25 ms per fed token, drafting free."""

    def __init__(self):
        super().__init__(4, verify_pads_rows=True, prior_acceptance=0.9)
        for tokens in (1, 101):
            self.verify.observe(tokens, 100.0 + 25.0 * tokens)
        self.observe_verify = lambda tokens, ms: None
        self.observe_draft = lambda tokens, ms: None
        self.verify.seed = lambda tokens, ms: None  # the engine's start-up timing too
        self.observe_catch_up = lambda tokens, ms: None

    def plan(self, row_ids, recut=False, backlog=None):
        return [self.max_tokens] * len(row_ids)


def _widths_by_drafting_rows(model, reqs, recut: bool) -> tuple[list, list]:
    """Run the batch with the blind plan; per step, (rows whose draft had nodes before any cut,
    the verified block's width), and the outputs."""
    engine = EmbeddedEngine(model, None, NgramDrafter(), 4, budget=_BlindPlan())
    drafting, widths = [], []
    forward, propose = engine._verify_forward, engine._propose

    def spy_forward(rows, cache, proposal):
        widths.append(proposal.tokens.shape[1])
        return forward(rows, cache, proposal)

    def spy_propose(rows, limits=None, count_nodes=False):
        proposal = propose(rows, limits, count_nodes)
        drafting.append(int(proposal.num_nodes.gt(0).sum()))
        return proposal

    engine._verify_forward, engine._propose = spy_forward, spy_propose
    if not recut:
        engine._recut = lambda limits: False
    outs, _ = engine.generate(reqs, batch_size=4)
    return list(zip(drafting, widths)), [o.output_token_ids for o in outs]


def test_unscored_drafts_are_cut_again_to_the_rows_that_drafted(tiny):
    """Four rows in a padded block, every row planned the whole width.  At these costs one row's
    chain widening all four rows cannot pay: the cut after drafting drops it, where keeping the
    plan verifies it (lookup drafts: some rows find a match, some do not)."""
    model = tiny[0]
    reqs = [Request([10, 20, 30, 40, 10, 20, 30, 40, 10, 20], 8)] + [
        Request([60 + 7 * i + j for j in range(6)], 8) for i in range(3)]
    plain = [o.output_token_ids for o in EmbeddedEngine(model, None, None).generate(reqs, 4)[0]]
    planned, out = _widths_by_drafting_rows(model, reqs, recut=False)
    assert out == plain
    assert any(rows == 1 and width > 0 for rows, width in planned), planned
    recut, out = _widths_by_drafting_rows(model, reqs, recut=True)
    assert out == plain
    lone = [width for rows, width in recut if rows == 1]
    assert lone and max(lone) == 0, recut


def test_a_recut_that_keeps_nothing_still_probes():
    """Planned blind, cut to nothing after drafting on every step: the cut counts the idle
    steps, so a probing token still comes (else a drafter once cut would never be tried
    again)."""
    plan = budget_with(100.0, 25.0, 0.0, {r: 0.9 for r in range(4)})
    plan.verify_pads_rows = True
    kept = []
    for _ in range(3 * 4 * plan.explore_every):
        assert min(plan.plan(list(range(4)), recut=True)) > 0  # the plan alone would draft
        kept.append(plan.cut([[0.9], [], [], []], calibrate=False))  # one row drafted
    assert [1, 0, 0, 0] in kept and kept.count([0, 0, 0, 0]) >= len(kept) - 3, kept


def test_a_jump_in_cost_past_one_token_a_row_is_seen_where_the_line_misses_it():
    """Plain steps of 4 rows take 60 ms, steps with drafts 130 ms whatever their width (a kernel
    switch, the tree mask): the line through them says a draft token costs little, the recent
    time per token count says every width costs 130 ms, which four rows at alpha 0.5 cannot
    pay.  With each count's own time forgotten (fresh_steps 0), the line decides and drafts."""
    def budget(fresh):
        plan = SpeculationBudget(4, verify_pads_rows=True)
        plan.verify.fresh_steps = fresh
        for r in range(4):
            plan._rows[r] = [500.0, 1000.0]
        for _ in range(5):
            for tokens in (4, 8, 12, 16, 20):
                plan.verify.observe(tokens, 60.0 if tokens == 4 else 130.0)
        return plan
    assert budget(256).plan(list(range(4))) == [0] * 4
    assert min(budget(0).plan(list(range(4)))) > 0
    fitted = budget(256).verify
    a, b = fitted.coefficients()
    assert fitted.at(8) == pytest.approx(130.0) and fitted.at(9) == pytest.approx(a + 9 * b)


class _CatchUpDrafter(NgramDrafter):
    """Drafting costs 20 ms per token committed since a row's last call (a head catching up on
    the features it missed), then one (wrong) token per row."""

    def propose(self, inp):
        from specplug.types import DraftProposal
        time.sleep(0.02 * sum(inp.num_new_committed))
        import torch
        return DraftProposal.chain(torch.full((len(inp.row_ids), 1), 3))


class _TwoOnTwoOff(SpeculationBudget):
    """Drafts one token a row on two steps, none on the next two: every other drafting step
    catches up on two skipped steps."""

    def __init__(self):
        super().__init__(1)
        self.calls = 0

    def plan(self, row_ids, recut=False, backlog=None):
        self.calls += 1
        return [1 if self.calls % 4 in (1, 2) else 0] * len(row_ids)


def test_draft_cost_per_token_leaves_out_the_catch_up_of_skipped_steps(tiny):
    """Draft time per token is what drafting costs when a row drafted at the last step too
    (20 ms for one token here); a step that also catches up on skipped ones (60 ms) is not
    counted, or drafting would look three times dearer after every skip."""
    model = tiny[0]
    budget = _TwoOnTwoOff()
    reqs = [Request([10, 20, 30, 40], 24)]
    EmbeddedEngine(model, None, _CatchUpDrafter(), 1, budget=budget).generate(reqs)
    assert 19.0 < budget.draft_ms_per_token < 30.0, budget.draft_ms_per_token
    # the catch-up has a price of its own: 20 ms per token taken in (the prompt, skipped steps)
    assert 19.0 < budget.catch_up_ms_per_token < 30.0, budget.catch_up_ms_per_token


@pytest.mark.parametrize("pads", [True, False])
def test_a_catch_up_spread_over_few_tokens_left_stops_drafting(pads):
    """t(N) = 100 + N ms, drafting free, rows at alpha 0.9: drafting pays.  A drafter that must
    first take in 300 tokens at 1 ms each does not pay when the row has 4 tokens left (75 ms a
    step); with 10000 left it costs 0.03 ms a step, and the rows draft as before."""
    def limits(backlog):
        plan = budget_with(100.0, 1.0, 0.0, {r: 0.9 for r in range(4)})
        plan.verify_pads_rows = pads
        plan.catch_up_ms_per_token = 1.0
        return plan.plan(list(range(4)), backlog=backlog)
    assert min(limits(None)) > 0
    assert limits([(300, 10_000)] * 4) == limits(None)
    assert limits([(300, 4)] * 4) == [0] * 4
    # rows already caught up draft beside one that is not (ragged verify: each row decides)
    mixed = limits([(0, 4), (0, 4), (0, 4), (300, 4)])
    assert min(mixed[:3]) > 0 and (mixed[3] == 0 or pads), mixed


def test_a_plan_after_a_probe_is_not_taken_for_one():
    """A probe, then a plan that drafts and leaves the idle bookkeeping to the cut: the engine
    must cut that plan after drafting (probing False), not keep it whole as it keeps a probe."""
    plan = budget_with(100.0, 25.0, 0.0, {r: 0.9 for r in range(4)})
    plan.verify_pads_rows, plan.explore_every = True, 1
    while not plan.probing:
        plan.cut([[0.9], [], [], []], calibrate=False)
    assert min(plan.plan(list(range(4)), recut=True)) > 0 and not plan.probing


@pytest.mark.parametrize("alpha,drafts", [(0.3, False), (0.9, True)])
def test_scored_drafters_are_planned_from_their_rows_acceptance(alpha, drafts):
    """Ten padded rows, t(N) = 100 + N ms, drafting 5 ms a token.  Drafts certain to be
    accepted would pay (one each: 20 tokens in 170 ms against 10 in 110), so the old rule
    (draft in full unless not even certain drafts pay) drafted every row here; rows accepting
    30% of drafts gain 13 tokens in 170 ms, less than plain decoding, so nobody drafts; at 90%
    every row gets the same width (padded)."""
    rows = list(range(10))
    plan = budget_with(100.0, 1.0, 5.0, {r: alpha for r in rows})
    plan.verify_pads_rows = True
    limits = plan.limits_before_scoring(rows)
    if drafts:
        assert min(limits) > 0 and len(set(limits)) == 1, limits
    else:
        assert limits == [0] * 10


# n-gram at batch 1 (MT-Bench 16, bf16, gamma 5; mtbench16_bf16_b1_128tok.json): how many of
# the drafted steps accepted 0, 1, ..., 5 tokens
NGRAM_ACCEPTED = {0: 1491, 1: 261, 2: 69, 3: 84, 4: 51, 5: 222}


def _fed_ngram_history(plan: SpeculationBudget) -> None:
    steps = [k for k, n in NGRAM_ACCEPTED.items() for _ in range(n)]
    for i in range(len(steps)):  # a fixed interleaving of the outcomes
        plan.observe_row(0, drafted=5, accepted=steps[(i * 7919) % len(steps)])


def test_gains_follow_each_depths_acceptance():
    """A copy that matched so far goes on matching: n-gram's j-th token was accepted after the
    first j - 1 with chance 0.31, 0.62, 0.84, 0.77, 0.81.  The gains are their running
    products; one rate per token (alpha ** i) put the fifth at a third of its measured chance."""
    plan = SpeculationBudget(5, engine_decay=1.0, acceptance_decay=1.0)
    _fed_ngram_history(plan)
    drafted = sum(NGRAM_ACCEPTED.values())
    measured = [sum(n for k, n in NGRAM_ACCEPTED.items() if k >= i) / drafted
                for i in range(1, 6)]
    assert plan.gains(0) == pytest.approx(measured, abs=0.005)
    assert plan.gains(99) == pytest.approx(measured, abs=0.005)  # a row without history
    alpha = plan.acceptance(0)
    assert alpha ** 5 < measured[4] / 3


def test_long_lookup_drafts_are_kept_where_one_rate_cut_them():
    """Batch 1, t(N) = 38 + 1.2 N ms, drafting free: with n-gram's measured depths the whole
    chain of 5 pays; the one-rate model (alpha ** i) would have stopped short."""
    plan = SpeculationBudget(5, verify_pads_rows=True, engine_decay=1.0, acceptance_decay=1.0)
    for n in (1, 101):
        plan.verify.observe(n, 38.0 + 1.2 * n)
    _fed_ngram_history(plan)
    assert plan.plan([0]) == [5]
    alpha = plan.acceptance(0)
    assert plan._best_width([[alpha ** i for i in range(1, 6)]], 0.0) < 5


def test_a_trees_untried_depths_are_not_counted():
    """A tree of 6 nodes, 2 deep, both levels accepted: depths 1 and 2 were tried and accepted,
    depth 3 did not exist (counting it as a chain of 6 would have marked it rejected)."""
    plan = SpeculationBudget(5, engine_decay=1.0)
    plan.observe_row(0, drafted=6, accepted=2, depth=2)
    assert plan._depths == [[1.0, 1.0], [1.0, 1.0]]
    plan.observe_row(0, drafted=5, accepted=1)  # a chain: token 2 tried and rejected
    assert plan._depths == [[2.0, 2.0], [1.0, 2.0]] + [[0.0, 0.0]] * 3


def test_drafts_measured_free_get_the_whole_width():
    """Steps of several widths took the same time and drafting is free: full width, not the
    one-token exploration of a budget that has measured nothing."""
    plan = SpeculationBudget(4)
    for tokens in (1, 2, 3, 5):
        plan.verify.seed(tokens, 30.0)
    assert plan.verify.coefficients() == (30.0, 0.0)
    assert plan.plan([0, 1]) == [4, 4]
    assert SpeculationBudget(4).plan([0, 1]) == [1, 1]  # nothing measured: explore
