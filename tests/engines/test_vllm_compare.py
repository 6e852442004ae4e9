"""benchmarks/vllm_compare.py on tiny models in real vLLM: every engine an engine session kept up
for the whole comparison, the engines taking turns, and each ratio's spread over repetitions."""
from __future__ import annotations

import json

import pytest

from specplug.benchmarks import vllm_compare

pytestmark = pytest.mark.engine


def test_compare_alternates_engines_and_reports_the_spread(tmp_path):
    out = tmp_path / "cmp.json"
    assert vllm_compare.main(["--tiny", "--pairs", "ngram", "--repeats", "2",
                              "--max-new-tokens", "16", "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    row = run["pairs"]["ngram"]
    spread = row["tokens_per_second_ratio_spread"]
    assert len(spread["per_rep"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    # the ratio of each repetition is specplug's tokens/s over vLLM's in that repetition
    for side in ("specplug", "vllm"):
        assert len(row[side]["speedup_vs_no_spec"]["per_rep"]) == 2
        assert row[side]["num_drafts"] > 0
    # greedy, every repetition: specplug's n-gram through the plugin gives vLLM's plain tokens
    assert row["specplug"]["identical_to_no_spec"] is True
    assert run["no_spec"]["total_new_tokens"] == 16 * run["num_prompts"]
    # eager unless --compile: the mode vLLM itself reports, per engine
    assert set(run["compilation_modes"]) == {"plain", "ngram-specplug", "ngram-vllm"}
    assert run["llm_kwargs"]["enforce_eager"] is True
