"""HF generate() anchors read acceptance off forward calls; the Leviathan bound; prompt rendering."""
import pytest
import torch

from specplug.benchmarks import metrics
from specplug.benchmarks.hf_anchor import HFGenerate, _Call, _record, _Recorder
from specplug.benchmarks.prompting import render
from specplug.datasets import PromptItem
from specplug.engine.rows import Request
from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer
from specplug.stats import SpecStats


def test_call_log_to_accept_lengths_literal():
    # S = prompt 1..7, then 20 21 22 23 24.  Call 0 feeds the prompt + 3 lookups (none equals
    # S[7] = 20): 1 token.  Call 1 feeds S[7] + 2 drafts equal to S[8:10]: 3 tokens.  Call 2 is a
    # plain step: 1 token.  5 new tokens in all.
    seq = [1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24]
    rec = _Recorder([_Call(0, seq[:7] + [9, 9, 9]), _Call(7, [20, 21, 22]), _Call(10, [23])])
    stats = SpecStats()
    assert _record(rec, seq, 7, stats) == [1, 3, 1]
    assert (stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_drafts) == (5, 2, 2)
    assert stats.counts_unavailable is None
    # a draft that is rejected stops the count even when a later draft happens to match
    stats = SpecStats()
    rec = _Recorder([_Call(0, seq[:7]), _Call(7, [20, 21, 99, 23])])
    assert _record(rec, seq[:10], 7, stats) == [2]
    assert (stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 1)
    # a plain run: the prefill token is not a verify step, as in the embedded engine
    stats = SpecStats()
    assert _record(_Recorder([_Call(0, seq[:7]), _Call(7, [20]), _Call(8, [21])]), seq[:10], 7,
                   stats) == [1, 1]
    assert stats.num_draft_tokens == 0


def test_unreadable_call_log_says_so_instead_of_counting():
    seq = list(range(1, 13))
    # no positions given to the target (what a transformers change could do)
    stats = SpecStats()
    assert _record(_Recorder([_Call(0, seq[:7]), _Call(None, seq[7:9])]), seq[:10], 7, stats) == []
    assert "call 1 got no position_ids" in stats.counts_unavailable
    assert stats.num_draft_tokens == 0 and stats.accept_lengths == []
    assert stats.summary()["counts_unavailable"] == stats.counts_unavailable
    # a call whose re-fed token is not the committed one (or leaves a gap) cannot be read either
    for bad in (_Call(7, [99, 9]), _Call(9, [10, 11])):
        stats = SpecStats()
        assert _record(_Recorder([_Call(0, seq[:7]), bad]), seq[:10], 7, stats) == []
        assert "does not continue the 8 committed tokens" in stats.counts_unavailable


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(0), build_tiny_tokenizer()


def _requests():
    g = torch.Generator().manual_seed(3)
    base = torch.randint(1, 256, (6,), generator=g).tolist()
    return [Request(base * 3, 20), Request(torch.randint(1, 256, (9,), generator=g).tolist(), 20)]


def test_hf_arms_match_plain_and_count_every_token(tiny):
    model, tok = tiny
    plain_stats = SpecStats()
    plain = HFGenerate(model, tok, "plain", 4).generate(_requests(), plain_stats)
    for mode, assistant in (("prompt_lookup", None), ("assisted", build_tiny_llama(0))):
        stats = SpecStats()
        outs = HFGenerate(model, tok, mode, 4, assistant=assistant).generate(_requests(), stats)
        assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in plain]
        for o in outs:  # every new token comes from some step (the first call may hold prefill)
            assert 0 <= o.num_new_tokens - sum(o.accept_lengths) <= 1
        # counted from what the arm observed (fed ids, positions, output), never negative
        assert stats.counts_unavailable is None, stats.counts_unavailable
        assert stats.num_draft_tokens > 0 and stats.total_new_tokens == 40
        assert 0 <= stats.num_accepted_tokens <= stats.num_draft_tokens
        assert stats.num_drafts <= len(stats.accept_lengths)
    # the assistant is the target itself: every draft is accepted
    assert stats.acceptance_rate == 1.0 and stats.timing_ms["draft"] > 0
    assert all(a == 1 for o in plain for a in o.accept_lengths)


def test_leviathan_bound_values():
    assert metrics.expected_accept_length(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)
    assert metrics.expected_accept_length(1.0, 4) == 5.0
    b = metrics.leviathan_bound(0.8, 4, 0.1)
    assert b["speedup_bound"] == pytest.approx(3.3616 / 1.4, abs=1e-4)
    assert metrics.leviathan_bound(0.0, 4, 0.0)["speedup_bound"] == 1.0


def test_draft_cost_is_draft_time_per_token_over_plain_step_time():
    spec = {"accept_length_histogram": {"1": 5, "3": 5}, "timing_ms": {"prefill": 9.0, "draft": 20.0}}
    base = {"accept_length_histogram": {"1": 40}, "timing_ms": {"prefill": 9.0, "verify": 200.0}}
    # 20 ms / 10 steps / gamma 4 = 0.5 ms per draft token; plain step = 5 ms
    assert metrics.draft_cost(spec, base, 4) == pytest.approx(0.1)


def test_tau_per_category_pools_steps():
    reqs = [{"category": "a", "accept_lengths": [1, 3]}, {"category": "a", "accept_lengths": [2]},
            {"category": "b", "accept_lengths": [4, 4]}]
    assert metrics.tau_per_category(reqs) == {"a": 2.0, "b": 4.0}


def test_turn_two_follows_the_models_own_answer(tiny):
    _, tok = tiny
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    item = PromptItem("1", "writing", ["Q one", "Q two"])
    assert render(tok, item, 0, [], True) == "<user>Q one<assistant>"
    assert render(tok, item, 1, ["A one"], True) == "<user>Q one<assistant>A one<user>Q two<assistant>"
    assert render(tok, item, 1, ["A one"], False) == "User: Q one\nAssistant: A one\nUser: Q two\nAssistant:"
    code = PromptItem("h", "humaneval", ["def f():"], chat=False)
    assert render(tok, code, 0, [], True) == "def f():"
    with pytest.raises(ValueError, match="turn 2 needs 1 earlier answers"):
        render(tok, item, 1, [], True)
