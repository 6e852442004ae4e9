"""specplug drafters inside real vLLM (CPU build, its own venv), one engine per subprocess.

Greedy output with a specplug drafter must be token-identical to vLLM's own no-spec output for
the same batch; a drafter equal to the target must have nearly every draft accepted; the plugin
entry point must load in every vLLM process; an unsupported vLLM must still serve.
"""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vllm_scripts"))
import harness  # noqa: E402

from specplug.integrations.vllm.subprocess_job import run_jobs, run_python  # noqa: E402

pytestmark = pytest.mark.engine

GAMMA = 4
MAX_NEW = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vllm-models"))
    target, tok = harness.build_target(os.path.join(root, "target"))
    return {
        "root": root,
        "target": os.path.join(root, "target"),
        "draft": harness.build_draft(os.path.join(root, "draft"), target, tok, noise=0.1),
        "other_tok_draft": harness.build_other_tokenizer_draft(os.path.join(root, "other")),
        "dream": harness.build_causal_dream(os.path.join(root, "dream"), target),
        "eagle": harness.build_eagle_head(os.path.join(root, "eagle"), target),
        "prompts": harness.tiny_prompts(tok, n=6),
    }


def job(models, **extra) -> dict:
    return {"target": models["target"], "prompt_ids": models["prompts"], "max_new_tokens": MAX_NEW,
            "ignore_eos": True, "llm_kwargs": dict(harness.LLM_KWARGS), **extra}


def specplug_job(models, method: str, path_key: str | None = None, budget: bool = False,
                 **options) -> dict:
    return job(models, specplug={"method": method, "num_draft_tokens": GAMMA, "options": options,
                                 "path": models[path_key] if path_key else None,
                                 "budget": budget})


CASES = {
    "ngram": ("ngram", None, {"max_ngram": 3}),
    "suffix": ("suffix", None, {}),
    "draft": ("draft", "draft", {}),
    "draft_other_tokenizer": ("draft", "other_tok_draft", {}),
    "specdiff": ("specdiff", "dream", {"unmask_order": "left_to_right"}),
    # hidden-state family: vLLM's own EAGLE on the specplug (SafeAILab layout) checkpoint
    "eagle": ("eagle", "eagle", {}),
}
# the speculation budget inside the plugin: per-request lengths, 0 included; a draft model keeps
# per-request state that must catch up over the steps the budget skipped
BUDGET_CASES = {"draft_budget": ("draft", "draft", {}), "ngram_budget": ("ngram", None, {})}


@pytest.fixture(scope="module")
def runs(models):
    """Every single-process engine of this file, each in its own process, two at a time."""
    jobs = {"baseline": job(models),
            "self": job(models, specplug={"method": "draft", "path": models["target"],
                                          "num_draft_tokens": GAMMA})}
    for case, (method, path_key, options) in CASES.items():
        jobs[case] = specplug_job(models, method, path_key, **options)
    for case, (method, path_key, options) in BUDGET_CASES.items():
        jobs[case] = specplug_job(models, method, path_key, budget=True, **options)
    return run_jobs(jobs, models["root"])


@pytest.fixture(scope="module")
def baseline(runs):
    """vLLM alone, same batch: the reference every drafter must reproduce."""
    outs = [r["output_token_ids"] for r in runs["baseline"]["requests"]]
    assert all(len(o) == MAX_NEW for o in outs)
    return outs


@pytest.mark.parametrize("case", list(CASES) + list(BUDGET_CASES))
def test_greedy_identity_with_vllm_no_spec(runs, baseline, case):
    res = runs[case]
    outs = [r["output_token_ids"] for r in res["requests"]]
    assert len(outs) == len(baseline) >= 4
    for i, (got, want) in enumerate(zip(outs, baseline)):
        assert got == want, f"{case}: request {i} differs from vLLM's no-spec output"
    s = res["summary"]
    assert s["num_drafts"] > 0 and s["num_draft_tokens"] > 0, f"{case}: vLLM saw no drafts"
    # vLLM's counters and its per-request accept lengths tell the same story
    assert sum(s["accept_length_histogram"].values()) == len(
        [a for r in res["requests"] for a in r["accept_lengths"]])
    assert s["num_accepted_tokens"] <= s["num_draft_tokens"]


def test_budget_leaves_steps_undrafted_and_the_draft_model_catches_up(runs):
    """Without the budget the draft model drafts every step; with it some steps carry no draft
    (its probe of the verify cost, at least), and the identity test above shows the drafter's
    state caught up over them."""
    def undrafted(case):
        res = runs[case]
        return sum(len(r["accept_lengths"]) for r in res["requests"]) - res["summary"]["num_drafts"]
    assert undrafted("draft") <= len(runs["draft"]["requests"])  # at most a final step each
    assert undrafted("draft_budget") > undrafted("draft")
    assert runs["draft_budget"]["summary"]["num_drafts"] > 0


def test_eagle_head_is_one_specplug_loads_too(models):
    from specplug.drafters.base import DrafterSpec, build_drafter
    from specplug.models.loading import load_causal_lm, load_tokenizer, target_info
    target = load_causal_lm(models["target"])
    drafter = build_drafter(DrafterSpec("eagle", models["eagle"]),
                            target_info(target, load_tokenizer(models["target"])))
    assert drafter.needs.hidden_layers  # the family vLLM runs through its own EAGLE proposer


def test_drafter_equal_to_target_accepts_every_draft(runs, baseline):
    res = runs["self"]
    assert [r["output_token_ids"] for r in res["requests"]] == baseline
    s = res["summary"]
    tau_drafted = 1 + s["num_accepted_tokens"] / s["num_drafts"]  # vLLM's mean acceptance length
    assert tau_drafted >= 0.95 * (GAMMA + 1), s
    assert s["acceptance_rate"] >= 0.95, s


def test_entry_point_loads_in_engine_core_and_worker_processes(models):
    script = os.path.join(harness.SCRIPTS, "multiprocess_plugin.py")
    proc = run_python([script, models["target"], str(GAMMA)], models["root"], multiprocess=True)
    result = _result_line(proc.stdout)
    loaded = dict(re.findall(r"specplug plugin loaded in (\S+) pid=(\d+)", proc.stderr))
    names = " ".join(loaded)
    assert "EngineCore" in names and "Worker" in names, proc.stderr[-3000:]
    assert {int(p) for p in loaded.values()} - {result["main_pid"]}, "only the main process loaded it"
    assert result["summary"]["num_accepted_tokens"] > 0  # the worker's proposer really drafted


def test_unsupported_vllm_still_serves_and_plugin_says_why(models, baseline):
    script = os.path.join(harness.SCRIPTS, "unsupported_version.py")
    n = 16
    proc = run_python([script, models["target"], "0.99.0", json.dumps(models["prompts"]), str(n)],
                      models["root"])
    result = _result_line(proc.stdout)
    assert result["registered"] == []
    assert "specplug plugin registered nothing" in proc.stderr
    assert "vLLM 0.99.0 is not a supported version" in proc.stderr
    # it served: the same greedy tokens as the no-spec baseline (a prefix of its longer run)
    assert result["outputs"] == [b[:n] for b in baseline]


def _result_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])
