"""The warm vLLM server (integrations/vllm/fork_server.py) behaves as `python ARGV...` would:
a fresh process per run, its own cwd, stdout and stderr kept apart, the exit status passed on,
and a run past its timeout killed.  The engine tests run every single-process vLLM job through
it, so their identity checks also cover what a forked child computes."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from specplug.integrations.vllm import subprocess_job

pytestmark = pytest.mark.engine

PROBE = textwrap.dedent("""
    import json, os, sys
    warm = "vllm" in sys.modules  # imported by the server before it forked
    import vllm
    print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                      "vllm_warm": warm, "left_by_earlier_run": getattr(vllm, "_probe", None)}))
    vllm._probe = os.getpid()  # a later run in this same process would see it
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def server():
    got = subprocess_job._fork_server()
    assert got is not None, "vLLM's CPU venv must run jobs through the fork server"
    return got


def test_each_run_is_a_fresh_warm_process_with_its_own_stdio(server, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    runs = []
    for n in range(2):
        work = tmp_path / f"w{n}"
        work.mkdir()
        proc = server.run([str(script), "0", f"run{n}"], str(work), timeout=60)
        assert proc.returncode == 0 and proc.stderr.strip() == "to stderr"
        runs.append(json.loads(proc.stdout))
        assert runs[-1]["cwd"] == str(work) and runs[-1]["argv"] == ["0", f"run{n}"]
    assert runs[0]["pid"] != runs[1]["pid"]
    assert all(r["vllm_warm"] and r["left_by_earlier_run"] is None for r in runs)
    assert server.run(["-m", "json.tool", "--help"], str(tmp_path), 60).returncode == 0


def test_exit_status_reaches_the_caller(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with pytest.raises(RuntimeError, match=r"failed \(rc 3\)[\s\S]*to stderr"):
        subprocess_job.run_python([str(script), "3"], str(tmp_path))


def test_a_run_past_its_timeout_is_killed(server, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        server.run([str(script)], str(tmp_path), timeout=3)
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}"), "the child outlived its timeout"


def test_a_child_that_cannot_start_fails_alone(server, tmp_path):
    """A run whose cwd does not exist fails with status 1; the server keeps serving."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    assert server.run([str(script), "0"], str(tmp_path / "missing"), 60).returncode == 1
    assert server.run([str(script), "0"], str(tmp_path), 60).returncode == 0
