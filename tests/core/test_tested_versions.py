"""The environment check: one warning line outside the tested torch/transformers, silence inside."""
import subprocess
import sys

from specplug import tested_versions
from specplug.tested_versions import TESTED, untested


def test_inside_the_tested_ranges_is_silent():
    lows = {name: f"{low[0]}.{low[1]}.0" for name, (low, _) in TESTED.items()}
    highs = {name: f"{high[0]}.{high[1]}.7+cpu" for name, (_, high) in TESTED.items()}
    assert untested(lows) == [] and untested(highs) == []


def test_outside_names_each_package_and_its_range():
    got = untested({"torch": "2.13.0+cpu", "transformers": "5.99.1"})
    assert got == ["transformers 5.99.1 (tested 5.19-5.24)"]
    got = untested({"torch": "2.12.0", "transformers": "4.57.0"})
    assert got == ["torch 2.12.0 (tested 2.13-2.14)", "transformers 4.57.0 (tested 5.19-5.24)"]
    assert untested({"torch": "garbage"})[0] == "torch garbage (tested 2.13-2.14)"
    assert "transformers missing" in untested({"torch": "2.13.0"})[0]


def test_cli_warns_in_one_line_and_still_runs(monkeypatch, capsys):
    monkeypatch.setattr(tested_versions, "TESTED", {"torch": ((1, 0), (1, 0))})
    from specplug.cli import main
    assert main(["methods"]) == 0
    out = capsys.readouterr()
    warning = out.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("specplug: warning: untested versions: torch")
    assert "ngram" in out.out


def test_cli_is_silent_on_the_locked_environment():
    res = subprocess.run([sys.executable, "-m", "specplug.cli", "methods"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
