"""Engine sessions (specplug/jobfile.py): one engine process per arm, alive for the whole run, so
engine arms alternate block by block.  A fake engine module stands in for SGLang: it speaks the
SGLang session's batch format over the embedded engine, and logs every open and run."""
import contextlib
import io
import json
import os
import sys
import textwrap

import pytest

from specplug.benchmarks import engines
from specplug.benchmarks.cli import main
from specplug.jobfile import EngineSessionError, SessionClient

FAKE_ENGINE = textwrap.dedent('''
    """Fake engine session: SGLang's batch format over the embedded engine."""
    import json
    import os
    import sys
    import time

    import torch

    from specplug.drafters.base import DrafterSpec, build_drafter
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.engine.rows import Request
    from specplug.jobfile import run_job_files
    from specplug.models.loading import load_causal_lm, load_tokenizer, target_info
    from specplug.types import SamplingParams
    from specplug.integrations.sglang.drafter_card import read_card

    LOG = os.environ["FAKE_ENGINE_LOG"]


    def note(text):
        with open(LOG, "a") as f:
            f.write(text + "\\n")


    class Session:
        def __init__(self, job):
            if os.environ.get("FAKE_ENGINE_FAIL_OPEN"):
                raise RuntimeError("no such device")
            algo = job["spec"].get("speculative_algorithm")
            self.name = algo or "plain"
            # the drafter's options, as specplug's SGLang worker reads them (a drafter card)
            card = read_card(job["spec"].get("speculative_draft_model_path"))
            options = json.dumps(card.options, separators=(",", ":"))
            note(f"open {self.name} {os.getpid()} {options}")
            model = load_causal_lm(job["target"], dtype=torch.float64)
            tok = load_tokenizer(job["target"])
            drafter = build_drafter(DrafterSpec("ngram"), target_info(model, tok)) if algo else None
            gamma = job["spec"].get("speculative_num_steps", 1)
            self.engine = EmbeddedEngine(model, tok, drafter, gamma, SamplingParams())

        def environment(self):
            return {"versions": {"fake": "1"}, "pid": os.getpid(), "cpu_standins": True}

        def run(self, batch):
            if batch.get("crash"):
                os._exit(3)
            if batch.get("sleep"):
                note(f"sleeping {os.getpid()}")
                time.sleep(batch["sleep"])
            if batch.get("fail"):
                raise ValueError("asked to fail")
            note(f"run {self.name} {os.getpid()} {len(batch['requests'])}")
            reqs = [Request(r["prompt_ids"], min(r["max_new_tokens"], batch.get("max_tokens") or
                                                 r["max_new_tokens"])) for r in batch["requests"]]
            outs, stats = self.engine.generate(reqs, len(reqs))
            return {"outputs": [o.__dict__ for o in outs], "stats": dict(stats.__dict__)}

        def close(self):
            note(f"close {self.name}")


    if __name__ == "__main__":
        sys.exit(run_job_files(None, "fake_engine", None, open_session=Session))
''')


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    (tmp_path / "fake_engine.py").write_text(FAKE_ENGINE)
    log = tmp_path / "engine.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")  # no SGLang CPU stand-ins for the fake
    monkeypatch.setitem(engines.SESSION_MODULES, "sglang", "fake_engine")
    monkeypatch.setattr(engines, "_sglang_python", lambda: sys.executable)
    return log


def test_session_serves_many_batches_and_reports_failures(fake_engine, tiny_models, tmp_path):
    client = SessionClient(sys.executable, "fake_engine", dict(os.environ), str(tmp_path / "s.log"))
    try:
        ready = client.call({"open": {"target": tiny_models["target"], "spec": {}}}, timeout=300)
        assert ready["ready"] and ready["environment"]["pid"] == client.proc.pid
        batch = {"requests": [{"prompt_ids": [1, 2, 3], "max_new_tokens": 4}]}
        first = client.call({"run": batch})
        assert client.call({"run": batch})["outputs"] == first["outputs"]
        # an exception is answered, and the engine keeps serving
        with pytest.raises(EngineSessionError, match="ValueError: asked to fail"):
            client.call({"run": dict(batch, fail=True)})
        assert client.call({"run": batch})["outputs"] == first["outputs"]
        # a dead engine is reported with its log, not waited for
        with pytest.raises(EngineSessionError, match="engine session died"):
            client.call({"run": dict(batch, crash=True)}, timeout=60)
    finally:
        client.close()
    log = fake_engine.read_text().splitlines()
    assert log[0] == f"open plain {client.proc.pid} {{}}" and len(log) == 4  # open + 3 runs


def test_a_killed_client_takes_its_engine_down(fake_engine, tiny_models, tmp_path):
    """The benchmark killed (SIGKILL) while its engine is mid-batch: the engine is shut down
    through its own close, not left running."""
    import signal
    import subprocess
    import time
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        from specplug.jobfile import SessionClient
        c = SessionClient(sys.executable, "fake_engine", dict(os.environ), {str(tmp_path / "s.log")!r})
        c.call({{"open": {{"target": {tiny_models["target"]!r}, "spec": {{}}}}}}, timeout=300)
        print(c.proc.pid, flush=True)
        c.proc.stdin.write('{{"run": {{"sleep": 120, "requests": []}}}}\\n')
        c.proc.stdin.flush()
        time.sleep(300)
        """)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.time() + 60
    while "sleeping" not in fake_engine.read_text() and time.time() < deadline:
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, os.WNOHANG)
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the engine session outlived its killed client")
    assert fake_engine.read_text().splitlines()[-1] == "close plain"  # shut down, not just gone


def test_bench_engine_arms_stay_up_and_alternate(fake_engine, tiny_models, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    out = tmp_path / "r"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--suite", "mtbench", "--num-prompts", "3", "--target", tiny_models["target"],
                     "--engine", "sglang", "--no-anchors", "--max-new-tokens", "8",
                     "--dtype", "float64", "--repeats", "2", "--output", str(out),
                     "--no-progress", "--name", "sess"]) == 0
    log = [ln.split() for ln in fake_engine.read_text().splitlines()]
    # one engine per arm and repetition, kept up for that repetition's warm-up and 3 blocks
    opens = [ln for ln in log if ln[0] == "open"]
    assert len(opens) == 4 and sorted({o[1] for o in opens}) == ["SPECPLUG_NGRAM", "plain"]
    spec_name = next(o[1] for o in opens if o[1] != "plain")
    runs = [ln for ln in log if ln[0] == "run"]
    assert len(runs) == 2 * 2 * (1 + 3)
    for rep in range(2):
        mine = runs[rep * 8:(rep + 1) * 8]
        pids = {o[1]: o[2] for o in opens[rep * 2:(rep + 1) * 2]}
        assert all(r[2] == pids[r[1]] for r in mine)  # the same process for every block
        # warm-up, then the arms take turns block by block, the first arm rotating (and the
        # repetitions starting one place on)
        order = [r[1] for r in mine]
        first = [spec_name, "plain"] if rep else ["plain", spec_name]
        assert order[:2] == ["plain", spec_name]
        assert order[2:4] == first and order[4:6] == first[::-1]
    assert len({o[2] for o in opens}) == 4  # a fresh process per arm and repetition
    assert sum(ln[0] == "close" for ln in log) == 4
    run = json.loads((out / "sess.json").read_text())
    assert [a["label"] for a in run["arms"]] == ["sglang/none", "sglang/ngram"]
    assert run["arms"][1]["matches_baseline"] == 3
    assert run["environment"]["cpu_standins"] is True
    assert run["environment"]["engines"]["sglang/ngram"]["versions"] == {"fake": "1"}
    assert len(run["speedup_spread"]["per_rep"]) == 2
    assert os.listdir(tmp_path / "tmp") == []  # clean sessions leave no logs behind


def test_compare_adds_engine_arms(fake_engine, tiny_models, tmp_path):
    out = tmp_path / "r"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--suite", "mtbench", "--num-prompts", "2", "--target", tiny_models["target"],
                     "--engine", "sglang", "--no-anchors", "--max-new-tokens", "4",
                     "--dtype", "float64", "--repeats", "1", "--output", str(out),
                     "--compare", "wide:ngram,max_ngram=2", "--gamma", "2",
                     "--no-progress", "--name", "cmp"]) == 0
    run = json.loads((out / "cmp.json").read_text())
    assert [a["label"] for a in run["arms"]] == ["sglang/none", "sglang/ngram", "sglang/wide"]
    assert run["arms"][2]["settings"]["options"] == {"max_ngram": "2"}  # as the CLI read it
    opens = [ln.split() for ln in fake_engine.read_text().splitlines() if ln.startswith("open")]
    assert len(opens) == 3  # every arm its own engine
    assert [o[3] for o in opens] == ["{}", "{}", '{"max_ngram":"2"}']  # a card carried them


def test_an_engine_that_fails_to_start_is_one_line(fake_engine, tiny_models, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_FAIL_OPEN", "1")
    out = tmp_path / "r"
    assert main(["--suite", "mtbench", "--num-prompts", "2", "--target", tiny_models["target"],
                 "--engine", "sglang", "--no-anchors", "--max-new-tokens", "4",
                 "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: no such device" in err, err
    assert "(log " in err and not out.exists()
