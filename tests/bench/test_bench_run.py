"""A bench run on tiny models writes one valid JSON whose baseline ran in the same run."""
import contextlib
import io
import json
import os
import sys
import types

import pytest

from specplug.benchmarks import engines, metrics
from specplug.benchmarks.cli import main

SUMMARY_KEYS = {"num_prompts", "total_new_tokens", "wall_time_s", "tokens_per_second",
                "mean_accept_length", "acceptance_rate", "num_drafts", "num_draft_tokens",
                "num_accepted_tokens", "timing_ms"}
TIMING_KEYS = {"prefill", "draft", "verify", "sample", "cache", "other"}


def _prompt_file(tmp_path):
    path = tmp_path / "two_turns.jsonl"
    rows = [{"turns": ["the cat sat on the", "and the dog"], "category": "animals"},
            {"turns": ["def add(a, b): return", "def mul(a, b):"], "category": "code"},
            {"prompt": "one two three four", "category": "code"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def draft_run(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "results"
    argv = ["--suite", _prompt_file(tmp), "--target", tiny_models["target"],
            "--drafter", tiny_models["draft"], "--turns", "2", "--max-new-tokens", "16",
            "--batch-size", "2", "--gamma", "3", "--dtype", "float64", "--output", str(out),
            "--no-progress", "--name", "tiny_draft", "--repeats", "2"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(argv)
    return rc, out, printed.getvalue()


def test_run_writes_the_stats_schema_with_the_baseline_in_the_same_run(draft_run):
    rc, out, printed = draft_run
    assert rc == 0
    run = json.loads((out / "tiny_draft.json").read_text())
    assert {"summary", "requests", "config", "environment"} <= set(run)
    assert SUMMARY_KEYS <= set(run["summary"]) and set(run["summary"]["timing_ms"]) == TIMING_KEYS
    assert {"versions", "threads", "device"} <= set(run["environment"])
    labels = [a["label"] for a in run["arms"]]
    assert labels == ["embedded/none", "embedded/draft", "hf/none", "hf/prompt_lookup",
                      "hf/assisted"]
    base, spec = run["arms"][0], run["arms"][1]
    assert base["role"] == "baseline" and run["headline"] == "embedded/draft"
    # same prompts for every arm: 3 turn-1 requests + 2 turn-2 requests
    for arm in run["arms"]:
        assert [(r["id"], r["turn"]) for r in arm["requests"]] == \
               [(r["id"], r["turn"]) for r in base["requests"]]
        assert [r["prompt"] for r in arm["requests"]] == [r["prompt"] for r in base["requests"]]
        # the summary pools both repetitions; the request records are the first one's
        assert arm["summary"]["num_prompts"] == 10 and len(arm["requests"]) == 5
        assert len(arm["tokens_per_second_per_rep"]) == 2
    spread = spec["speedup_spread"]
    assert len(spread["per_rep"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert spec["speedup"] == spread["median"] and run["speedup_spread"] == spread
    # each repetition's speedup is a ratio of two arms of that repetition
    assert spread["per_rep"] == pytest.approx(
        [a / b for a, b in zip(spec["tokens_per_second_per_rep"],
                               base["tokens_per_second_per_rep"])], rel=1e-3)
    hf_assisted = run["arms"][4]
    assert spec["hf_equivalent"] == "hf/assisted"
    assert spec["speedup_vs_hf_equivalent_spread"]["per_rep"] == pytest.approx(
        [a / b for a, b in zip(spec["tokens_per_second_per_rep"],
                               hf_assisted["tokens_per_second_per_rep"])], rel=1e-3)
    # greedy float64: every arm's tokens equal its engine's plain run, and the engines agree
    assert all(a.get("matches_baseline", 5) == 5 for a in run["arms"])
    assert [r["output_token_ids"] for r in base["requests"]] == \
           [r["output_token_ids"] for r in run["arms"][2]["requests"]]
    assert spec["summary"]["num_draft_tokens"] > 0
    assert spec["tau_per_category"] == metrics.tau_per_category(spec["requests"])
    assert set(spec["tau_per_category"]) == {"animals", "code"}
    lev = spec["leviathan"]
    assert lev["alpha"] == spec["summary"]["acceptance_rate"] and lev["gamma"] == 3
    assert lev["speedup_bound"] == pytest.approx(
        metrics.expected_accept_length(lev["alpha"], 3) / (3 * lev["draft_cost"] + 1), rel=1e-3)
    assert lev["draft_cost"] > 0
    assert printed.count("[BatchSummary]") == 5 and "embedded/draft" in printed


def test_turn_two_prompt_holds_the_baselines_turn_one_answer(draft_run):
    _, out, _ = draft_run
    base = json.loads((out / "tiny_draft.json").read_text())["arms"][0]["requests"]
    first = {r["id"]: r for r in base if r["turn"] == 1}
    second = [r for r in base if r["turn"] == 2]
    assert len(second) == 2  # the third prompt has a single turn
    for r in second:
        answer = first[r["id"]]["output_text"]
        assert answer and (f"Assistant: {answer}\nUser:" in r["prompt"])


def test_each_turn_is_reported_on_its_own(draft_run):
    _, out, _ = draft_run
    run = json.loads((out / "tiny_draft.json").read_text())
    base, spec = run["arms"][0], run["arms"][1]
    for arm in run["arms"]:
        turns = arm["per_turn"]
        assert sorted(turns) == ["1", "2"]
        # 3 prompts have a first turn, 2 a second; both repetitions pooled
        assert [turns[t]["num_requests"] for t in ("1", "2")] == [3, 2]
        assert sum(turns[t]["total_new_tokens"] for t in turns) == \
            arm["summary"]["total_new_tokens"]
        assert sum(turns[t]["wall_time_s"] for t in turns) == pytest.approx(
            arm["summary"]["wall_time_s"], rel=1e-3)
        assert all(len(turns[t]["tokens_per_second_per_rep"]) == 2 for t in turns)
    for t in ("1", "2"):
        mine, plain = spec["per_turn"][t], base["per_turn"][t]
        assert mine["speedup_spread"]["per_rep"] == pytest.approx(
            [a / b for a, b in zip(mine["tokens_per_second_per_rep"],
                                   plain["tokens_per_second_per_rep"])], rel=1e-3)
        assert plain["speedup"] is None  # the baseline is not divided by itself
    assert all(1.0 <= spec["per_turn"][t]["mean_accept_length"] <= 4.0 for t in ("1", "2"))


def test_plots_are_written(draft_run):
    _, out, _ = draft_run
    names = sorted(os.listdir(out / "plots"))
    assert names == ["tiny_draft_accept_hist.png", "tiny_draft_tau_category.png",
                     "tiny_draft_throughput.png"]
    for n in names:
        assert (out / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_self_draft_accepts_every_draft_and_ngram_runs(tiny_models, tmp_path):
    out = tmp_path / "r"
    assert main(["--suite", "mtbench", "--num-prompts", "2", "--target", tiny_models["target"],
                 "--drafter", tiny_models["self"], "--method", "draft", "--no-anchors",
                 "--max-new-tokens", "12", "--gamma", "3", "--dtype", "float64",
                 "--output", str(out), "--no-progress", "--name", "self"]) == 0
    spec = json.loads((out / "self.json").read_text())["arms"][1]
    assert spec["summary"]["acceptance_rate"] == 1.0
    assert [a["label"] for a in json.loads((out / "self.json").read_text())["arms"]] == \
           ["embedded/none", "embedded/draft"]
    assert main(["--suite", "humaneval", "--num-prompts", "2", "--target", tiny_models["target"],
                 "--drafter", "ngram", "--engine", "hf", "--max-new-tokens", "12",
                 "--dtype", "float64", "--output", str(out), "--no-progress"]) == 0
    run = json.loads((out / "humaneval_t1_hf_ngram_n2.json").read_text())
    assert [a["label"] for a in run["arms"]] == ["hf/none", "hf/prompt_lookup"]


def test_repetitions_start_from_fresh_drafters(tiny_models, tmp_path):
    """Suffix decoding stores earlier outputs: reused across repetitions it would meet every
    prompt of the second one with its answer stored.  Fresh arms per repetition: the same
    acceptance every time (greedy), and the warm-up (other prompts) leaves no answer stored."""
    out = tmp_path / "s"
    assert main(["--suite", "mtbench", "--num-prompts", "3", "--target", tiny_models["target"],
                 "--method", "suffix", "--no-anchors", "--max-new-tokens", "24", "--gamma", "3",
                 "--dtype", "float64", "--repeats", "2", "--output", str(out), "--no-progress",
                 "--name", "fresh"]) == 0
    spec = json.loads((out / "fresh.json").read_text())["arms"][1]
    taus = spec["mean_accept_length_per_rep"]
    assert len(taus) == 2 and taus[0] == taus[1], taus
    assert spec["summary"]["num_draft_tokens"] > 0


def test_compare_adds_drafter_arms_to_the_same_run(tiny_models, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["--suite", "mtbench", "--num-prompts", "2", "--target", tiny_models["target"],
                 "--drafter", "ngram", "--no-anchors", "--max-new-tokens", "12", "--gamma", "3",
                 "--dtype", "float64", "--output", str(out), "--no-progress", "--name", "cmp",
                 "--compare", f"self:draft@{tiny_models['self']}",
                 "--compare", "ng2:ngram,max_ngram=2"]) == 0
    arms = {a["label"]: a for a in json.loads((out / "cmp.json").read_text())["arms"]}
    assert list(arms) == ["embedded/none", "embedded/ngram", "embedded/self", "embedded/ng2"]
    assert arms["embedded/self"]["summary"]["acceptance_rate"] == 1.0
    assert arms["embedded/ng2"]["settings"]["options"] == {"max_ngram": "2"}
    assert arms["embedded/self"]["speedup"] is not None
    # a repeated label, or a path that does not exist: one-line errors, nothing written
    assert main(["--suite", "mtbench", "--num-prompts", "1", "--target", tiny_models["target"],
                 "--no-anchors", "--output", str(tmp_path / "bad"), "--no-progress",
                 "--compare", "ngram"]) == 2
    assert main(["--suite", "mtbench", "--num-prompts", "1", "--target", tiny_models["target"],
                 "--no-anchors", "--output", str(tmp_path / "bad"), "--no-progress",
                 "--compare", "draft@/no/such/folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "arm labels must differ" in err[0] and "not found: /no/such/folder" in err[1]
    assert not (tmp_path / "bad").exists()


def test_without_gamma_each_arm_drafts_its_methods_own(tiny_models, tmp_path):
    """No --gamma: suffix arms get suffix's long cap, n-gram and HF prompt lookup n-gram's, and
    the report says so; the recorded config keeps None (no one number ran)."""
    from specplug.benchmarks.report import environment_lines, load_runs
    out = tmp_path / "own"
    assert main(["--suite", "mtbench", "--num-prompts", "2", "--target", tiny_models["target"],
                 "--method", "suffix", "--compare", "ngram", "--max-new-tokens", "8",
                 "--dtype", "float64", "--repeats", "1", "--output", str(out), "--no-progress",
                 "--name", "own"]) == 0
    run = json.loads((out / "own.json").read_text())
    gammas = {a["label"]: a["settings"].get("gamma") for a in run["arms"]}
    assert gammas == {"embedded/none": None, "embedded/suffix": 24, "embedded/ngram": 5,
                      "hf/none": None, "hf/prompt_lookup": 5}, gammas
    assert run["config"]["gamma"] is None
    assert run["arms"][1]["leviathan"]["gamma"] == 24
    assert "gamma per arm (embedded/suffix 24, embedded/ngram 5, hf/prompt_lookup 5)" in \
        environment_lines(load_runs(str(out)))


def test_also_engine_reports_its_plain_arm_against_the_main_engines(tiny_models, tmp_path):
    """--also-engine: another engine's arms join the run, and its plain arm carries its
    tokens/s over the main engine's plain arm, repetition by repetition."""
    from specplug.benchmarks.report import load_runs, results_table
    out = tmp_path / "also"
    assert main(["--suite", "mtbench", "--num-prompts", "2", "--target", tiny_models["target"],
                 "--engine", "hf", "--also-engine", "embedded", "--method", "none",
                 "--max-new-tokens", "6", "--dtype", "float64", "--repeats", "2",
                 "--output", str(out), "--no-progress", "--name", "also"]) == 0
    arms = {a["label"]: a for a in json.loads((out / "also.json").read_text())["arms"]}
    assert list(arms) == ["hf/none", "hf/prompt_lookup", "embedded/none"]
    emb, hf = arms["embedded/none"], arms["hf/none"]
    assert emb["reference"] == "hf/none" and "reference" not in hf
    ratios = [a / b for a, b in zip(emb["tokens_per_second_per_rep"],
                                    hf["tokens_per_second_per_rep"])]
    spread = emb["speedup_vs_reference_spread"]
    assert spread["min"] == pytest.approx(min(ratios), rel=1e-2)
    assert spread["max"] == pytest.approx(max(ratios), rel=1e-2)
    assert emb["matches_reference"] == 2  # float64 greedy: the same tokens either way
    row = next(line for line in results_table(load_runs(str(out))).splitlines()
               if "| embedded/none |" in line)
    assert "(hf/none)" in row


def test_external_engine_plugs_in_through_its_run_function(tiny_models, tmp_path, monkeypatch):
    """A stand-in run_fake built on the embedded engine: the switch calls it block by block for
    the baseline (drafter=None) and for the drafter, alternating."""
    from specplug.benchmarks.runner import BenchConfig, run_bench
    from specplug.drafters.base import build_drafter
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.models.loading import load_causal_lm, load_tokenizer, target_info
    import torch
    calls = []

    def run_fake(target, requests, drafter, num_draft_tokens, sampling, batch_size):
        calls.append((drafter.method if drafter else None, len(requests)))
        model = load_causal_lm(target, dtype=torch.float64)
        tok = load_tokenizer(target)
        d = build_drafter(drafter, target_info(model, tok)) if drafter else None
        return EmbeddedEngine(model, tok, d, num_draft_tokens, sampling).generate(requests, batch_size)

    mod = types.ModuleType("fake_engine_generate")
    mod.run_fake = run_fake
    monkeypatch.setitem(sys.modules, "fake_engine_generate", mod)
    monkeypatch.setitem(engines._EXTRAS, "fake", ("fake_engine_generate", "run_fake"))
    run = run_bench(BenchConfig(suite="mtbench", target=tiny_models["target"], engine="fake",
                                anchors=False, num_prompts=3, max_new_tokens=10, dtype="float64",
                                repeats=1, block=2), progress=False, log=lambda *a: None)
    # warm-up block, then blocks of 2 and 1 with the arms' order rotating
    assert calls == [(None, 2), ("ngram", 2), (None, 2), ("ngram", 2), ("ngram", 1), (None, 1)]
    assert [a["label"] for a in run["arms"]] == ["fake/none", "fake/ngram"]
    assert run["arms"][1]["matches_baseline"] == 3 and run["summary"]["num_prompts"] == 3
    # one block a turn: the repetitions take turns at going first
    calls.clear()
    run_bench(BenchConfig(suite="mtbench", target=tiny_models["target"], engine="fake",
                          anchors=False, num_prompts=2, max_new_tokens=6, dtype="float64",
                          repeats=2, block=2), progress=False, log=lambda *a: None)
    warm = [(None, 2), ("ngram", 2)]
    assert calls == warm + [(None, 2), ("ngram", 2)] + warm + [("ngram", 2), (None, 2)]


def test_errors_are_one_line_and_write_nothing(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECPLUG_SGLANG_PYTHON", str(tmp_path / "no-python"))
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sglang" else find_spec(name, *a))
    out = tmp_path / "none"
    base = ["--target", tiny_models["target"], "--output", str(out), "--no-progress",
            "--num-prompts", "1", "--max-new-tokens", "4"]
    cases = [(["--suite", "mtbench", "--engine", "sglang"], "pip install 'specplug[sglang]'"),
             (["--suite", "nope"], "unknown suite 'nope'"),
             (["--suite", "mtbench", "--method", "bogus"], "unknown method 'bogus'"),
             (["--suite", "mtbench", "--drafter", str(tmp_path / "missing")], "drafter path not found"),
             (["--suite", "mtbench", "--gamma", "0"], "--gamma must be >= 1")]
    for extra, needle in cases:
        assert main(extra + base) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert main(["--suite", "mtbench", "--target", str(tmp_path / "nomodel"), "--no-progress"]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert not out.exists()


def test_vllm_job_result_becomes_outputs_and_stats():
    from specplug.engine.rows import Request
    from specplug.stats import SpecStats
    got = {"summary": {"num_prompts": 2, "total_new_tokens": 7, "wall_time_s": 0.5,
                       "num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 3,
                       "timing_ms": {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "sample": 0.0,
                                     "cache": 0.0, "other": 500.0}},
           "requests": [{"output_token_ids": [5, 6, 7, 8], "accept_lengths": [3, 1],
                         "finish_reason": "length"},
                        {"output_token_ids": [9, 9, 9], "accept_lengths": [2, 1],
                         "finish_reason": "eos"}]}
    stats = SpecStats()
    outs = engines._from_job(got, [Request([1, 2], 4), Request([3], 4)], None, stats)
    assert [o.output_token_ids for o in outs] == [[5, 6, 7, 8], [9, 9, 9]]
    assert outs[1].finish_reason == "eos" and outs[0].prompt_ids == [1, 2]
    assert stats.accept_lengths == [3, 1, 2, 1] and stats.acceptance_rate == 0.5
    assert stats.total_new_tokens == 7 and stats.timing_ms["other"] == 500.0


def test_vllm_arms_with_and_without_the_budget_and_vllms_own_methods():
    """--budget both gives each plugin arm a /budget twin whose job asks for the budget; an arm
    with native=1 (vLLM's own ngram / suffix) gets neither the twin nor the flag."""
    from specplug.drafters.base import DrafterSpec
    t = engines.BenchTarget("/t", None, None, DrafterSpec("suffix"), 5, None, 1, budget="both",
                            compare=[("vllm-suffix", DrafterSpec("suffix", None, {"native": 1}))])
    arms = engines._vllm_drafter_arms(t)
    assert [label for label, _ in arms] == ["suffix", "suffix/budget", "vllm-suffix"]
    assert [d.options for _, d in arms] == [{}, {"budget": 1}, {"native": 1}]
    t.budget = "off"
    assert [label for label, _ in engines._vllm_drafter_arms(t)] == ["suffix", "vllm-suffix"]


def test_vllm_without_vllm_names_the_extra(monkeypatch, tmp_path):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("SPECPLUG_VLLM_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(engines.EngineUnavailable, match=r"specplug\[vllm\]"):
        engines.check_engine("vllm")


def test_sweep_runs_each_batch_size_and_reports_speedup_against_it(tiny_models, tmp_path, capsys):
    from specplug.benchmarks.batch_sweep import sweep_table
    from specplug.benchmarks.report import load_runs, report
    out = tmp_path / "sw"
    assert main(["sweep", "--batch-sizes", "2,1", "--suite", "mtbench", "--num-prompts", "2",
                 "--target", tiny_models["target"], "--method", "suffix", "--budget", "both",
                 "--no-anchors", "--max-new-tokens", "8", "--gamma", "3", "--dtype", "float64",
                 "--repeats", "1", "--output", str(out), "--no-progress", "--name", "sw"]) == 0
    runs = load_runs(str(out))
    assert [(r["name"], r["config"]["batch_size"], r["config"]["sweep"]) for r in runs] == \
           [("sw_b1", 1, "sw"), ("sw_b2", 2, "sw")]
    table = sweep_table(runs).splitlines()
    assert table[2] == "| arm | batch 1 | batch 2 |"
    assert [row.split(" | ")[0] for row in table[4:]] == \
           ["| embedded/suffix", "| embedded/suffix/budget"]
    assert (out / "plots" / "sw_speedup_vs_batch.png").exists()
    readme = tmp_path / "README.md"
    report(str(out), None, plots=False, docs={str(readme): ("batch-sweep",)})
    assert "| embedded/suffix/budget |" in readme.read_text()
    # a bad size list: one line, nothing written
    assert main(["sweep", "--batch-sizes", "1,x", "--suite", "mtbench", "--target",
                 tiny_models["target"], "--output", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "--batch-sizes '1,x'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
