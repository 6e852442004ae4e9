"""The vLLM adapter's translation, without vLLM: fake configs and result objects in, specplug types
out.  (The real engine runs in test_vllm_engine.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specplug.drafters.draft_model import DraftModelDrafter
from specplug.drafters.ngram import NgramDrafter, lookup
from specplug.integrations.vllm import compat
from specplug.integrations.vllm.generate import (_spec_counters, _stats, _to_output,
                                                 speculative_settings)
from specplug.integrations.vllm.proposer import (CLASS_PATH, SpecplugProposer, drafter_block_from,
                                                 proposal_to_lists)
from specplug.engine.rows import Request
from specplug.models.tiny import build_tiny_llama
from specplug.types import DraftProposal


def fake_config(gamma=3, max_model_len=24, additional=None):
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=gamma),
                           model_config=SimpleNamespace(max_model_len=max_model_len),
                           additional_config=additional or {})


def token_matrix(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows) + 2, width), dtype=np.int32)  # vLLM's buffer has spare rows
    lens = np.zeros(len(rows) + 2, dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        lens[i] = len(r)
    return ids, lens


def test_propose_translates_rows_and_skips_rows_that_did_not_sample():
    rows = [[1, 2, 3, 4, 1, 2], [7, 8, 9, 7, 8], [5, 5, 5]]
    ids, lens = token_matrix(rows, 24)
    prop = SpecplugProposer(fake_config(gamma=3), drafter=NgramDrafter(3, 1), check_vllm=False)
    out = prop.propose([[2], [], [5]], lens, ids)
    assert out == [[3, 4, 1], [], lookup(torch.tensor(rows[2]), 3, 1, 3)]
    assert out[0] == lookup(torch.tensor(rows[0]), 3, 1, 3)


def test_propose_never_drafts_past_max_model_len():
    rows = [[1, 2, 3, 4, 5, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 1, 2]]
    ids, lens = token_matrix(rows, 10)
    prop = SpecplugProposer(fake_config(gamma=4, max_model_len=10), drafter=NgramDrafter(3, 1),
                            check_vllm=False)
    out = prop.propose([[4], [2]], lens, ids)
    assert out == [[5], [3, 4]]  # room for 1 and 2 more tokens


def test_row_index_reused_by_another_request_drafts_like_a_fresh_drafter():
    model = build_tiny_llama(0)
    a, b = [3, 9, 27, 81, 11], [50, 60, 70, 80]
    shared = SpecplugProposer(fake_config(gamma=3), DraftModelDrafter(model, 256), check_vllm=False)
    ids, lens = token_matrix([a, b], 24)
    first = shared.propose([[11], [80]], lens, ids)
    # vLLM condensed its batch: request b now sits in row 0, row 1 is gone
    ids, lens = token_matrix([b + first[1][:1]], 24)
    again = shared.propose([[first[1][0]]], lens, ids)
    fresh = SpecplugProposer(fake_config(gamma=3), DraftModelDrafter(model, 256), check_vllm=False)
    assert again == fresh.propose([[first[1][0]]], lens, ids)
    assert len(again[0]) == 3


def test_trees_are_refused_with_a_clear_error():
    tree = DraftProposal(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, -1, 0]]))
    with pytest.raises(ValueError, match="chains only"):
        proposal_to_lists(tree)
    assert proposal_to_lists(DraftProposal.chain(torch.tensor([[5, 6, -1]]))) == [[5, 6]]


def test_drafter_block_from_additional_config():
    block = drafter_block_from({"specplug": {"method": "draft", "path": "/d", "options": {"k": 1},
                                             "budget": "on"}})
    spec = block.spec()
    assert (spec.method, spec.path, spec.options, block.budget) == ("draft", "/d", {"k": 1}, True)
    with pytest.raises(ValueError, match="needs additional_config"):
        drafter_block_from({})
    with pytest.raises(ValueError, match="additional_config\\['specplug'\\] needs 'method'"):
        drafter_block_from({"specplug": {"path": "/d"}})
    with pytest.raises(ValueError, match="unknown keys \\['gamma'\\]"):
        drafter_block_from({"specplug": {"method": "ngram", "gamma": 3}})
    # a misspelt switch is an error, not a quiet "off" (it was read as truthy before)
    with pytest.raises(ValueError, match="'budget' must be on or off"):
        drafter_block_from({"specplug": {"method": "ngram", "budget": "maybe"}})


def test_speculative_settings_per_family():
    spec, extra = speculative_settings("ngram", None, {"max_ngram": 2}, 4)
    assert spec == {"method": "custom_class", "model": CLASS_PATH, "num_speculative_tokens": 4}
    assert extra == {"specplug": {"method": "ngram", "options": {"max_ngram": 2}}}
    spec, extra = speculative_settings("eagle3", "/heads/e3", None, 5)
    assert spec == {"method": "eagle3", "model": "/heads/e3", "num_speculative_tokens": 5}
    assert extra == {}
    assert speculative_settings("none", None, None, 5) == (None, {})
    with pytest.raises(ValueError, match="needs a drafter checkpoint"):
        speculative_settings("dflash", None, None, 5)


def test_native_option_runs_vllms_own_lookup_methods():
    """native=1 names vLLM's own ngram / suffix (a benchmark's comparison arm): no plugin, the
    n-gram sizes translated to vLLM's keys, other options passed as speculative_config keys."""
    spec, extra = speculative_settings("ngram", None, {"native": "1", "max_ngram": 4}, 5)
    assert extra == {}
    assert spec == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
                    "prompt_lookup_min": 1}
    spec, extra = speculative_settings(
        "suffix", None, {"native": True, "suffix_decoding_min_token_prob": 0.2}, 3, budget=True)
    assert extra == {}
    assert spec == {"method": "suffix", "num_speculative_tokens": 3,
                    "suffix_decoding_min_token_prob": 0.2}
    with pytest.raises(ValueError, match="no checkpoint-free method like 'draft'"):
        speculative_settings("draft", "/d", {"native": "1"}, 3)
    # native=0 is specplug's drafter through the plugin, the flag gone from its options
    spec, extra = speculative_settings("suffix", None, {"native": "0"}, 3)
    assert spec["method"] == "custom_class" and extra["specplug"]["options"] == {}


def test_version_gate():
    assert compat.version_supported("0.32.0") and compat.version_supported("0.32.1")
    assert not compat.version_supported("0.33.0")
    assert not compat.version_supported("0.320.0")


def _fake_result(tokens, finish, stop_reason=None, accepted=None):
    metrics = SimpleNamespace(per_step_accepted=accepted) if accepted is not None else None
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, text="x", finish_reason=finish,
                                                    stop_reason=stop_reason,
                                                    spec_decode_metrics=metrics)])


def test_outputs_and_stats_from_vllm_results():
    req = Request([1, 2], 8)
    # 8 tokens: 1 from prefill, drafted steps accepting 2 and 3 (3 + 4 tokens), 0 undrafted
    out = _to_output(req, _fake_result(list(range(8)), "length", accepted=[2, 3]))
    assert out.accept_lengths == [3, 4] and out.finish_reason == "length"
    # 6 tokens, one drafted step accepting 1 (2 tokens): 3 undrafted steps of 1
    out2 = _to_output(req, _fake_result(list(range(6)), "stop", accepted=[1]))
    assert out2.accept_lengths == [2, 1, 1, 1] and out2.finish_reason == "eos"
    out3 = _to_output(req, _fake_result([4], "stop", stop_reason="END"))
    assert out3.finish_reason == "stop" and out3.accept_lengths == []
    metrics = [SimpleNamespace(name="vllm:spec_decode_num_drafts", value=2),
               SimpleNamespace(name="vllm:spec_decode_num_drafts", value=1),  # a second engine
               SimpleNamespace(name="vllm:spec_decode_num_draft_tokens", value=12),
               SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=6),
               SimpleNamespace(name="vllm:num_requests_running", value=9)]
    counters = _spec_counters(metrics)
    assert counters == {"num_drafts": 3, "num_draft_tokens": 12, "num_accepted_tokens": 6}
    stats = _stats([out, out2], counters, wall=2.0)
    assert stats.total_new_tokens == 14 and stats.tokens_per_second == 7.0
    assert stats.histogram() == {1: 3, 2: 1, 3: 1, 4: 1}
    assert stats.summary()["acceptance_rate"] == 0.5


def test_request_rows_follow_requests_across_vllm_rows():
    from specplug.integrations.vllm.request_rows import RequestRows
    a = lambda *t: np.array(t, dtype=np.int32)  # noqa: E731
    rows = RequestRows()
    assert rows.assign([a(1, 2, 3), a(7, 8)]) == [0, 1]
    # request 0 finished; vLLM condensed request 1 into row 0
    assert rows.assign([a(7, 8, 9)]) == [1] and rows.forgotten == [0]
    # a new request joins in row 1; request 1 stays
    assert rows.assign([a(7, 8, 9, 4), a(5, 6)]) == [1, 2] and rows.forgotten == []
    # the two swap rows
    assert rows.assign([a(5, 6, 6), a(7, 8, 9, 4, 4)], [0, 1]) == [2, 1]
    # a context that extends nobody's committed tokens is a new request, even in a known row
    assert rows.assign([a(5, 9, 9, 9), a(7, 8, 9, 4, 4, 1)]) == [3, 1] and rows.forgotten == [2]
    assert rows.assign([]) == [] and rows.forgotten == [3, 1]


def test_moved_request_keeps_its_draft_cache():
    """vLLM moves a request to another row: the draft model must not re-prefill it."""
    model = build_tiny_llama(0)
    drafter = DraftModelDrafter(model, 256)
    fed = []
    feed = drafter._feed
    drafter._feed = lambda rids, feeds: fed.append(sum(map(len, feeds))) or feed(rids, feeds)
    prop = SpecplugProposer(fake_config(gamma=2, max_model_len=64), drafter, check_vllm=False)
    a, b = list(range(3, 23)), list(range(40, 70))
    ids, lens = token_matrix([a, b], 64)
    first = prop.propose([[22], [69]], lens, ids)
    fed.clear()
    ids, lens = token_matrix([b + first[1][:1] + [5]], 64)  # a finished; b moved into row 0
    prop.propose([[5]], lens, ids)
    assert fed[0] <= 2, f"moved request re-fed {fed[0]} tokens"  # its accepted draft + the new one


def test_cli_option_via_plugin_routes_eagle3_through_the_plugin(monkeypatch, tmp_path):
    from specplug.api import GenerateConfig
    from specplug.integrations.vllm import generate
    from specplug.models.tiny import build_tiny_tokenizer, save_model
    target = save_model(build_tiny_llama(0), build_tiny_tokenizer(), str(tmp_path / "t"))
    seen = {}

    def fake_run(target, requests, spec, extra, sampling, llm_kwargs=None):
        seen.update(spec=spec, extra=extra)
        return [], None
    monkeypatch.setattr(generate, "run_vllm_requests", fake_run)
    for flag, via in (("1", True), ("0", False)):
        cfg = GenerateConfig(target=target, prompts=["a b"], method="eagle3", drafter="/heads/e3",
                             options={"via_plugin": flag})
        generate.run_vllm(cfg)
        assert (seen["spec"]["method"] == "custom_class") is via, seen
        if via:
            assert seen["extra"]["specplug"]["method"] == "eagle3"
            assert "via_plugin" not in seen["extra"]["specplug"].get("options", {})


def test_budget_in_the_proposer_cuts_lists_and_the_drafter_catches_up():
    """With additional_config budget: per-request lists cut to the budget, [] for rows whose
    budget is 0, and a draft model whose row skipped steps proposes what a drafter that saw every
    step proposes (num_new_committed covers the skipped steps)."""
    from specplug.budget import StepBudget
    model = build_tiny_llama(0)
    cfg = fake_config(gamma=3, max_model_len=64, additional={"specplug": {"method": "draft",
                                                                          "budget": True}})
    prop = SpecplugProposer(cfg, DraftModelDrafter(model, 256), check_vllm=False)
    fresh = SpecplugProposer(fake_config(gamma=3, max_model_len=64), DraftModelDrafter(model, 256),
                             check_vllm=False)
    plans = iter([[3, 3], [0, 2], [0, 0], [1, 3]])
    backlogs = []
    prop.steps.begin = lambda rows, committed, **kw: backlogs.append(kw["backlog"]) or next(plans)
    assert isinstance(prop.steps, StepBudget)
    rows = [[3, 9, 27, 81, 11], [50, 60, 70, 80]]
    for step in range(4):
        ids, lens = token_matrix(rows, 64)
        got = prop.propose([[r[-1]] for r in rows], lens, ids)
        want = fresh.propose([[r[-1]] for r in rows], lens, ids)
        limits = [[3, 3], [0, 2], [0, 0], [1, 3]][step]
        assert got == [w[:k] for w, k in zip(want, limits)], step
        for r, w in zip(rows, want):  # every row commits its first draft and one more token
            r += (w[:1] or [7]) + [5]
    # the budget saw what was handed out, per row
    assert prop.steps._drafted == {0: 1, 1: 3}
    # and each row's backlog (tokens to take in beyond the step's one, tokens left of 64):
    # whole prompts first, then two tokens a step, the second past the one committed, plus
    # every step the budget skipped for the row
    assert backlogs == [[(5, 59), (4, 60)], [(1, 57), (1, 58)], [(3, 55), (1, 56)],
                        [(5, 53), (3, 54)]]


def _suffix_proposers() -> tuple[SpecplugProposer, SpecplugProposer]:
    """(a suffix proposer with the budget on, the same drafter without it), gamma 3."""
    from specplug.drafters.suffix import SuffixDrafter
    cfg = fake_config(gamma=3, max_model_len=64, additional={"specplug": {"method": "suffix",
                                                                          "budget": True}})
    return (SpecplugProposer(cfg, SuffixDrafter(), check_vllm=False),
            SpecplugProposer(fake_config(gamma=3, max_model_len=64), SuffixDrafter(),
                             check_vllm=False))


def test_budget_cuts_a_scored_drafter_after_drafting_by_its_scores():
    """suffix scores its nodes: on a first step (nothing measured: every row drafts in full) the
    proposer hands the budget the scores and returns what budget.cut() kept; the scores of what
    was handed out are summed for the budget's calibration."""
    prop, full = _suffix_proposers()
    seen = []

    def cut(scores, calibrate=True):
        seen.append(scores)
        return [min(1, len(s)) for s in scores]

    prop.steps.budget.cut = cut
    rows = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6, 7, 5, 6]]
    ids, lens = token_matrix(rows, 64)
    got = prop.propose([[r[-1]] for r in rows], lens, ids)
    want = full.propose([[r[-1]] for r in rows], lens, ids)
    assert all(len(w) == 3 for w in want)  # both rows repeat: full chains
    assert got == [w[:1] for w in want]
    assert [len(s) for s in seen[0]] == [3, 3] and all(0 < p <= 1 for s in seen[0] for p in s)
    assert prop.steps._predicted == pytest.approx(seen[0][0][0] + seen[0][1][0])


@pytest.mark.parametrize("probing", [False, True])
def test_a_planned_scored_draft_is_cut_unless_it_is_a_probe(probing):
    """A plan shorter than gamma still goes through the cut by scores; a probe's token is kept
    as it is (the cut never sees it)."""
    prop, full = _suffix_proposers()
    seen = []

    def cut(scores, calibrate=True):
        seen.append(scores)
        return [1, 0]

    prop.steps.begin = lambda rows, committed, **kw: [2, 2]
    prop.steps.budget.probing = probing
    prop.steps.budget.cut = cut
    rows = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6, 7, 5, 6]]
    ids, lens = token_matrix(rows, 64)
    got = prop.propose([[r[-1]] for r in rows], lens, ids)
    want = full.propose([[r[-1]] for r in rows], lens, ids)
    if probing:
        assert not seen and got == [w[:2] for w in want]
    else:
        assert [len(s) for s in seen[0]] == [2, 2] and got == [want[0][:1], []]


def test_the_proposer_leaves_prompt_feeding_out_of_the_drafting_time():
    """A first call feeds the drafter whole prompts: that time is not the cost of its draft
    tokens, so the budget's drafting time per token is measured from the next call on."""
    prop, _ = _suffix_proposers()
    clock = [0.0]
    prop.steps.clock = lambda: clock[0]
    seen = []
    observe = prop.steps.budget.observe_draft
    prop.steps.budget.observe_draft = lambda tokens, ms: seen.append(tokens) or observe(tokens, ms)
    rows = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6, 7, 5, 6]]
    ids, lens = token_matrix(rows, 64)
    first = prop.propose([[r[-1]] for r in rows], lens, ids)
    assert seen == []  # prompts fed: not timed
    rows = [r + [7] for r in rows]  # each row committed one token
    ids, lens = token_matrix(rows, 64)
    prop.propose([[7], [7]], lens, ids)
    assert len(seen) == 1, (first, seen)
