"""The CLI end to end on a tiny model folder: outputs, stats JSON, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = build_tiny_tokenizer()
    target = save_model(build_tiny_llama(0, dtype=__import__("torch").float32, max_pos=64), tok,
                        str(root / "target"))
    draft = save_model(build_tiny_llama(0, dtype=__import__("torch").float32, max_pos=64), tok,
                       str(root / "draft"))
    # a draft with a smaller vocabulary and no tokenizer: cannot be mapped to the target's
    small = save_model(build_tiny_llama(0, dtype=__import__("torch").float32, vocab_size=100), None,
                       str(root / "small_vocab"))
    prompts = root / "prompts.txt"
    prompts.write_text("the cat sat on the mat\nhello world, hello\ndef add(a, b):\n")
    return {"target": target, "draft": draft, "small": small, "prompts": str(prompts), "root": root}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "specplug.cli", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


def test_generate_writes_stats_and_matches_plain(tiny_dirs):
    outs = {}
    for method in ("none", "draft", "ngram", "suffix"):
        stats_path = tiny_dirs["root"] / f"{method}.json"
        args = ["generate", "--target", tiny_dirs["target"], "--prompts-file", tiny_dirs["prompts"],
                "--max-new-tokens", "12", "--batch-size", "2", "--method", method,
                "--stats-output", str(stats_path)]
        if method == "draft":  # gamma every step: how much it accepts must not hang on timing
            args += ["--drafter", tiny_dirs["draft"], "--no-budget"]
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        assert "[BatchSummary]" in res.stdout
        stats = json.loads(stats_path.read_text())
        assert set(stats) == {"summary", "requests", "config", "environment"}
        s = stats["summary"]
        for key in ("num_prompts", "total_new_tokens", "wall_time_s", "tokens_per_second",
                    "mean_accept_length", "acceptance_rate", "num_drafts", "num_draft_tokens",
                    "num_accepted_tokens"):
            assert key in s
        assert set(s["timing_ms"]) == {"prefill", "draft", "verify", "sample", "cache", "other"}
        assert s["num_prompts"] == 3
        req = stats["requests"][0]
        assert {"prompt", "output_text", "output_token_ids", "num_new_tokens", "accept_lengths"} <= set(req)
        outs[method] = [r["output_token_ids"] for r in stats["requests"]]
        if method == "draft":
            assert s["mean_accept_length"] > 3.0  # draft == target
            assert stats["config"]["budget"] is False and "budget_histogram" not in s
        if method == "ngram":  # the budget is on by default: each step's choice is recorded
            assert stats["config"]["budget"] is True and "budget_histogram" in s
        # no --gamma: the method's own default, recorded (suffix's proposals stop by themselves)
        assert stats["config"]["gamma"] == (24 if method == "suffix" else 5)
    # float32 here: the same weights as target give identical greedy output
    assert outs["draft"] == outs["none"] == outs["ngram"] == outs["suffix"]


@pytest.mark.parametrize("case", ["missing_target", "unknown_method", "unmappable_vocab",
                                  "prompt_too_long", "missing_prompts_file", "bad_top_p"])
def test_bad_input_is_one_line_error(case, tiny_dirs, capfd):
    t = tiny_dirs["target"]
    args = {
        "missing_target": ["--target", "/no/such/model", "--prompt", "x"],
        "unknown_method": ["--target", t, "--prompt", "x", "--method", "telepathy"],
        "unmappable_vocab": ["--target", t, "--prompt", "x", "--drafter", tiny_dirs["small"],
                             "--method", "draft"],
        "prompt_too_long": ["--target", t, "--prompt", "the cat sat " * 40],
        "missing_prompts_file": ["--target", t, "--prompts-file", "/no/prompts.txt"],
        "bad_top_p": ["--target", t, "--prompt", "x", "--temperature", "1", "--top-p", "0"],
    }[case]
    if case == "unknown_method":  # the console entry point itself, in a fresh process
        res = run_cli("generate", *args)
        returncode, stderr = res.returncode, res.stderr
    else:  # the same main() in this process: a fresh one costs ~12 s of imports on this CPU
        from specplug.cli import main
        returncode = main(["generate", *args])
        stderr = capfd.readouterr().err
    assert returncode != 0
    # an untested torch/transformers adds its own warning line (tested_versions.py) before it
    err = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line
           and not line.startswith("specplug: warning: untested versions")]
    assert len(err) == 1, stderr
    assert err[0].startswith("specplug: error:")
    assert "Traceback" not in stderr
    expect = {"missing_target": "not found", "unknown_method": "unknown method",
              "unmappable_vocab": "vocabulary", "prompt_too_long": "context",
              "missing_prompts_file": "not found", "bad_top_p": "top_p"}[case]
    assert expect in err[0]


def test_methods_lists_families():
    res = run_cli("methods")
    assert res.returncode == 0
    assert {"none", "ngram", "draft"} <= set(res.stdout.split())
