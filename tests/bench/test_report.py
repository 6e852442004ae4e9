"""`specplug bench report DIR` rebuilds the README table and the plots from saved JSON alone."""
import contextlib
import io
import json
import os

import pytest

from specplug.benchmarks import report as report_mod
from specplug.benchmarks.cli import main


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "results"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--suite", "mtbench", "--num-prompts", "12", "--target", tiny_models["target"],
                     "--drafter", "ngram", "--max-new-tokens", "12", "--gamma", "3",
                     "--dtype", "float64", "--output", str(out), "--no-progress",
                     "--name", "tiny_ngram", "--repeats", "2"]) == 0
    return out, printed.getvalue()


def _table_from(printed: str) -> str:
    return "\n".join(ln for ln in printed.splitlines() if ln.startswith("|"))


def test_report_reproduces_the_table_and_plots_without_models(results, tmp_path, monkeypatch):
    out, printed = results
    plots = sorted(os.listdir(out / "plots"))
    assert plots == ["tiny_ngram_accept_hist.png", "tiny_ngram_tau_category.png",
                     "tiny_ngram_throughput.png"]
    before = {p: (out / "plots" / p).read_bytes() for p in plots}
    for p in plots:
        (out / "plots" / p).unlink()
    # no model may be loaded: the report reads JSON only
    import specplug.models.loading as loading
    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nHand-written intro.\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(out), "--readme", str(readme)]) == 0
    # same table as the run printed, same plot files byte for byte
    text = readme.read_text()
    table = _table_from(printed)
    assert table and table in text
    assert {p: (out / "plots" / p).read_bytes() for p in sorted(os.listdir(out / "plots"))} == before
    assert text.startswith("# Benchmarks\n\nHand-written intro.\n")
    for p in plots:
        assert f"]({os.path.relpath(out / 'plots' / p, tmp_path)})" in text
    # running it again replaces the section instead of appending another
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == text and text.count(report_mod.BEGIN) == 1


def test_table_numbers_come_from_the_json(results):
    out, _ = results
    run = json.loads((out / "tiny_ngram.json").read_text())
    table = report_mod.results_table(report_mod.load_runs(str(out)))
    rows = {ln.split(" | ")[1]: ln.split(" | ") for ln in table.splitlines()[2:]}
    spec = next(a for a in run["arms"] if a["label"] == "embedded/ngram")
    row = rows["embedded/ngram"]
    assert row[4] == f"{spec['summary']['tokens_per_second']:.2f}"
    sp, hf = spec["speedup_spread"], spec["speedup_vs_hf_equivalent_spread"]
    assert row[2] == "12 ×2"
    assert row[5] == f"{sp['median']:.3f}× ({sp['min']:.3f}–{sp['max']:.3f}, 2 reps)"
    assert row[6] == f"{hf['median']:.3f}× ({hf['min']:.3f}–{hf['max']:.3f}, 2 reps) (hf/prompt_lookup)"
    assert row[7] == f"{spec['summary']['mean_accept_length']:.3f}"
    assert row[10].rstrip(" |") == "12/12"
    assert rows["hf/none"][6] == "–"  # a plain arm has no drafter to compare
    assert len(rows) == 4
    # a run saved before repetitions existed reads as one run
    old = dict(spec, speedup_spread=None)
    assert report_mod.spread_text(old["speedup"], old["speedup_spread"]).endswith("× (1 run)")


def test_report_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such results folder" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"not": "a bench run"}')
    assert main(["report", str(tmp_path), "--readme", str(tmp_path / "R.md")]) == 2
    assert "no specplug bench JSON files" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"schema": ')
    assert main(["report", str(tmp_path), "--readme", str(tmp_path / "R.md")]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_report_fills_the_generated_blocks_of_other_docs(results, tmp_path):
    import shutil
    out, _ = results
    runs_dir = tmp_path / "runs"
    shutil.copytree(out, runs_dir)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copy(os.path.join(repo, "benchmarks", "results", "vllm_compare_tiny.json"), runs_dir)
    docs, both = {}, []
    for name in ("headline", "vllm-compare"):
        begin, end = report_mod.markers(name)
        doc = tmp_path / f"{name}.md"
        doc.write_text(f"intro\n\n{begin}\nstale 9.99x\n{end}\n\noutro\n")
        docs[str(doc)] = (name,)
        both.append(f"{begin}\nstale 9.99x\n{end}")
    (tmp_path / "both.md").write_text("\n\nmiddle\n\n".join(both) + "\n")  # two blocks, one file
    docs[str(tmp_path / "both.md")] = ("headline", "vllm-compare")
    with contextlib.redirect_stdout(io.StringIO()):
        report_mod.report(str(runs_dir), str(tmp_path / "R.md"), plots=False, docs=docs)
    combined = (tmp_path / "both.md").read_text()
    assert "9.99x" not in combined and "\n\nmiddle\n\n" in combined
    assert "| vllm_compare_tiny.json |" in combined and "| embedded/ngram |" in combined
    head = (tmp_path / "headline.md").read_text()
    assert head.startswith("intro\n\n") and head.endswith("\n\noutro\n") and "9.99x" not in head
    spec = next(a for a in json.loads((out / "tiny_ngram.json").read_text())["arms"]
                if a["label"] == "embedded/ngram")
    sp = spec["speedup_spread"]
    assert f"| embedded/ngram | {sp['median']:.3f}× ({sp['min']:.3f}–{sp['max']:.3f}, 2 reps) |" in head
    compare = json.loads((runs_dir / "vllm_compare_tiny.json").read_text())
    vllm_doc = (tmp_path / "vllm-compare.md").read_text()
    draft = compare["pairs"]["draft"]
    # that run predates the recorded modes: it shows what it asked vLLM for
    assert (f"| vllm_compare_tiny.json | draft: specplug vs vllm | eager (asked) | "
            f"{compare['no_spec']['tokens_per_second']:.1f} | "
            f"{draft['specplug']['tokens_per_second']:.1f} | {draft['vllm']['tokens_per_second']:.1f}"
            f" | {draft['tokens_per_second_ratio']:.3f}× (1 run) |") in vllm_doc


def test_compile_target_table_reads_its_json(tmp_path):
    spread = {"min": 0.9, "median": 0.95, "max": 1.01, "per_rep": [0.9, 0.95, 1.01]}
    run = {"method": "none", "batch_size": 10, "identical_outputs": False,
           "tokens_per_second": {"eager": {"median": 20.0}, "compiled": {"median": 19.0}},
           "compiled_over_eager": spread, "warmup_s": {"eager": 3.0, "compiled": 61.4},
           "dynamo": {"graph_breaks": 27}}
    (tmp_path / "compile_target_x.json").write_text(json.dumps(run))
    table = report_mod.compile_target_table(str(tmp_path))
    assert ("| compile_target_x.json | none | 10 | 20.00 | 19.00 | 0.950× (0.900–1.010, 3 reps) "
            "| NO | 61 | 27 |") in table


def test_step_time_table_divides_by_the_steps_and_the_plain_step():
    def arm(label, role, draft, verify, steps=None, hist=None):
        summary = {"timing_ms": {"draft": draft, "verify": verify, "sample": 10.0,
                                 "cache": 10.0}, "accept_length_histogram": hist or {}}
        if steps:
            summary["num_steps"] = steps
        return {"label": label, "role": role, "engine": "embedded", "summary": summary}
    counted = {"name": "b4", "config": {"batch_size": 4, "repeats": 3},
               "arms": [arm("embedded/none", "baseline", 0.0, 380.0, steps=10),
                        arm("embedded/suffix", "spec", 40.0, 580.0, steps=8)]}
    # before the engine counted steps: at batch 1 one per accept length
    batch1 = {"name": "b1", "config": {"batch_size": 1, "repeats": 3},
              "arms": [arm("embedded/none", "baseline", 0.0, 180.0, hist={"1": 10}),
                       arm("embedded/ngram", "spec", 4.0, 180.0, hist={"1": 3, "3": 2})]}
    one_rep = dict(counted, name="once", config={"batch_size": 4, "repeats": 1})
    lines = report_mod.step_time_table([counted, batch1, one_rep]).splitlines()[2:]
    assert lines == [
        "| b4 | embedded/none | 4 | 10 | 0.0 | 38.0 | 1.0 | 1.0 | – |",
        "| b4 | embedded/suffix | 4 | 8 | 5.0 | 72.5 | 1.2 | 1.2 | 0.125 |",  # 5 / 40 ms
        "| b1 | embedded/none | 1 | 10 | 0.0 | 18.0 | 1.0 | 1.0 | – |",
        "| b1 | embedded/ngram | 1 | 5 | 0.8 | 36.0 | 2.0 | 2.0 | 0.040 |"]  # 0.8 / 20 ms


def test_turn_table_lists_each_turn_of_two_turn_runs():
    spread = {"min": 1.1, "median": 1.2, "max": 1.3, "per_rep": [1.1, 1.2, 1.3]}
    turns = {"1": {"num_requests": 3, "tokens_per_second": 20.04, "mean_accept_length": 1.5,
                   "speedup": 1.2, "speedup_spread": spread},
             "2": {"num_requests": 2, "tokens_per_second": 25.0, "mean_accept_length": 2.0,
                   "speedup": None, "speedup_spread": None}}
    two = {"name": "t2", "arms": [{"label": "embedded/ngram", "per_turn": turns}]}
    one = {"name": "t1", "arms": [{"label": "embedded/ngram"}]}
    lines = report_mod.turn_table([two, one]).splitlines()[2:]
    assert lines == [
        "| t2 | embedded/ngram | 1 | 3 | 20.0 | 1.50 | 1.200× (1.100–1.300, 3 reps) |",
        "| t2 | embedded/ngram | 2 | 2 | 25.0 | 2.00 | – |"]
