"""SpecStats travels between processes as a dict (engine subprocesses, benchmark sessions) and
adds up across runs (benchmark blocks): both must keep every field."""
import json

import pytest

from specplug.stats import SpecStats


def _stats(seed: int) -> SpecStats:
    s = SpecStats(num_prompts=2 + seed, total_new_tokens=30 + seed, wall_time_s=1.5 + seed)
    s.record_step(4, 2)
    s.record_step(4, 0)
    s.record_step(0, 0)
    s.timing_ms["verify"] = 10.0 + seed
    s.budgets = [4, 0, seed]
    s.num_steps = 3 + seed
    return s


def test_dict_round_trip_through_json_keeps_every_field():
    s = _stats(1)
    s.counts_unavailable = "engine could not say"
    back = SpecStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.summary() == s.summary()
    with pytest.raises(ValueError, match="unknown fields \\['surprise'\\]"):
        SpecStats.from_dict(dict(s.to_dict(), surprise=1))


def test_merge_adds_counts_and_concatenates_steps():
    a, b = _stats(0), _stats(2)
    total = SpecStats.from_dict(a.to_dict())
    total.merge(b)
    assert total.num_prompts == a.num_prompts + b.num_prompts
    assert total.total_new_tokens == a.total_new_tokens + b.total_new_tokens
    assert total.wall_time_s == pytest.approx(a.wall_time_s + b.wall_time_s)
    assert total.num_draft_tokens == 16 and total.num_accepted_tokens == 4 and total.num_drafts == 4
    assert total.accept_lengths == a.accept_lengths + b.accept_lengths
    assert total.budgets == a.budgets + b.budgets
    assert total.num_steps == a.num_steps + b.num_steps == 8
    assert total.timing_ms["verify"] == pytest.approx(22.0)
    assert total.tokens_per_second == pytest.approx(
        (a.total_new_tokens + b.total_new_tokens) / (a.wall_time_s + b.wall_time_s))
