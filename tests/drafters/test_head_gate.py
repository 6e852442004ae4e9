"""The hybrid's head gate on literal steps: the walk that attributes accepted tokens to a tree,
the credit x G / N > H / T rule, and probing while the head is skipped."""
from specplug.drafters.head_gate import HeadGate, _children, _walk
from specplug.types import PAD, ROOT

# the lookup's chain 5 6 7; the head's tree 5 -> {6, 9 -> 4}
LOOKUP = ([5, 6, 7], [ROOT, 0, 1])
HEAD = ([5, 6, 9, 4, PAD], [ROOT, 0, 0, 2, ROOT])


def test_walk_table():
    lookup, head = _children(*LOOKUP), _children(*HEAD)
    assert _walk(lookup, [5, 6, 7, 8]) == 3
    assert _walk(head, [5, 6, 7, 8]) == 2
    assert _walk(head, [5, 9, 4, 1]) == 3  # the head's second branch
    assert _walk(lookup, [5, 9, 4, 1]) == 1
    assert _walk(head, [8, 5]) == 0  # a walk starts at the root only
    assert _walk(_children([], []), [5]) == 0


class _Clock:
    """A step with the head takes `step_ms`; the gate reads the clock once a call (start_call)."""
    def __init__(self, step_ms: float):
        self.now, self.step_ms = 0.0, step_ms

    def __call__(self) -> float:
        return self.now

    def tick(self, ms: float) -> None:
        self.now += ms / 1e3


def _steps(gate: HeadGate, clock: _Clock, committed_after, head_ms: float,
           calls: int, skip_ms: float | None = None) -> list[bool]:
    """Run `calls` calls of one row whose lookup and head propose LOOKUP and HEAD every time,
    and whose next committed tokens are `committed_after` each time (a list, or a function of
    the call's number); returns whether each call ran the head.  A step that skips the head
    takes skip_ms (default: the step less the head's time)."""
    skip_ms = clock.step_ms - head_ms if skip_ms is None else skip_ms
    ids, ran = [1, 2, 3], []
    for call in range(calls):
        gate.start_call([0], [ids])
        if gate.wants_head():
            gate.ran_head(head_ms, [0], [ids], [LOOKUP], [HEAD])
            ran.append(True)
        else:
            gate.skipped_head()
            ran.append(False)
        ids = ids + (committed_after(call) if callable(committed_after) else committed_after)
        clock.tick(clock.step_ms if ran[-1] else skip_ms)
    return ran


def test_a_head_that_adds_tokens_keeps_running():
    clock = _Clock(20.0)
    gate = HeadGate(min_steps=3, credit=1.0, clock=clock)
    # each step the head's second branch gets 3 accepted where the lookup's gets 1:
    # G / N = 2 / 4 = 0.5 > H / T = 5 / 20
    ran = _steps(gate, clock, [5, 9, 4, 1], head_ms=5.0, calls=30)
    assert all(ran)
    assert gate.pays()
    gained, committed, head_ms, step_ms = gate.steps[-1]
    assert (gained, committed, head_ms) == (2, 4, 5.0)
    assert abs(step_ms - 20.0) < 1e-6


def test_walks_stop_at_the_tokens_accepted():
    # the budget cut the head's tree to 5 -> 9 and verification then added 4, the node it cut:
    # 2 drafts accepted, 1 of them past the lookup's walk; 3 tokens committed
    clock = _Clock(20.0)
    gate = HeadGate(min_steps=3, credit=1.0, clock=clock)
    _steps(gate, clock, [5, 9, 4], head_ms=5.0, calls=4)
    assert gate.steps[-1][:2] == (1, 3)


def test_a_head_that_adds_nothing_is_skipped_and_probed():
    clock = _Clock(20.0)
    gate = HeadGate(min_steps=3, probe_every=4, probe_max=8, probe_steps=2, clock=clock)
    # the lookup's chain is what gets committed: the head adds nothing for its 5 ms
    ran = _steps(gate, clock, [5, 6, 7, 8], head_ms=5.0, calls=40)
    # a measured step needs the head on the call before (the first call is not one) and is
    # settled on the call after: 3 measured steps take 4 calls
    assert ran[:4] == [True] * 4
    # then 4 skips, a probe (a catch-up and 2 measured steps), 8 skips, a probe, 8 skips
    assert ran[4:8] == [False] * 4 and ran[8:11] == [True] * 3
    assert ran[11:19] == [False] * 8 and ran[19:22] == [True] * 3
    assert ran[22:30] == [False] * 8
    assert not gate.pays()


def test_a_bad_stretch_does_not_switch_off_a_head_that_pays():
    # 16 calls where the head adds 2 of 4 committed tokens, then 16 where it adds none, and so
    # on: G / N = 0.25 over the memory against H / T = 4 / 20 = 0.2.  A 16-step window would
    # see only the bad stretch, switch the head off and probe it among old bad steps.
    clock = _Clock(20.0)
    gate = HeadGate(credit=1.0, clock=clock)
    ran = _steps(gate, clock, lambda call: [5, 6, 7, 8] if (call // 16) % 2 else [5, 9, 4, 1],
                 head_ms=4.0, calls=320)
    # skipped only to time steps without it: 4 calls after 32, 64 and 128 that ran it (after
    # the 16 measured steps that come first)
    assert _skipped_runs(ran) == [4] * 3 and ran[:49] == [True] * 49
    # at 6 ms (0.3) a head whose gain alternates call by call (0.25 again) does not pay: after
    # its first 16 measured steps it runs on probes only: 5 calls after 16, 32, 64, 64, 64 skips
    clock = _Clock(20.0)
    gate = HeadGate(credit=1.0, clock=clock)
    ran = _steps(gate, clock, lambda call: [5, 6, 7, 8] if call % 2 else [5, 9, 4, 1],
                 head_ms=6.0, calls=320)
    assert ran[:17] == [True] * 17 and sum(ran) == 17 + 5 * 5


def test_the_time_a_skipped_step_saves_is_measured():
    # G / N = 0.25 against H / T = 4 / 20 = 0.2, but the head's nodes also widen the verify
    # pass: a step without it takes 10 ms, not 16 (1 - S / T = 0.5).  Once the first check has
    # timed skipped steps, the head runs on probes only.
    clock = _Clock(20.0)
    gate = HeadGate(credit=1.0, clock=clock)
    ran = _steps(gate, clock, lambda call: [5, 6, 7, 8] if call % 2 else [5, 9, 4, 1],
                 head_ms=4.0, calls=320, skip_ms=10.0)
    assert ran[:49] == [True] * 49 and sum(ran[100:]) < 0.2 * len(ran[100:])
    # where a skipped step saves only the head's time, the same head keeps running
    clock = _Clock(20.0)
    gate = HeadGate(credit=1.0, clock=clock)
    ran = _steps(gate, clock, lambda call: [5, 6, 7, 8] if call % 2 else [5, 9, 4, 1],
                 head_ms=4.0, calls=320)
    assert _skipped_runs(ran) == [4] * 3


def _skipped_runs(ran: list[bool]) -> list[int]:
    """The lengths of the runs of calls that skipped the head."""
    runs, length = [], 0
    for r in ran + [True]:
        if not r:
            length += 1
        elif length:
            runs, length = runs + [length], 0
    return runs


def test_the_rule_weighs_gain_against_time():
    def gated(head_ms: float, credit: float) -> list[bool]:
        clock = _Clock(20.0)
        return _steps(HeadGate(min_steps=3, credit=credit, clock=clock), clock, [5, 9, 4, 1],
                      head_ms=head_ms, calls=8)
    # G / N = 2 / 4 = 0.5 against H / T = 12 / 20 = 0.6: the head's gain does not pay
    assert gated(12.0, credit=1.0)[-1] is False
    # at 8 ms (0.4) it does
    assert all(gated(8.0, credit=1.0))
    # credited 1.5x (0.75), the 12 ms head pays and a 16 ms one (0.8) does not
    assert all(gated(12.0, credit=1.5))
    assert gated(16.0, credit=1.5)[-1] is False
