"""specplug.runners: the engines besides the embedded one are looked up by name, registered by
their integrations, and no integration imports specplug.api (no import cycle between them)."""
import ast
import pathlib

import pytest

from specplug import runners

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_unknown_engine_is_named():
    with pytest.raises(ValueError, match="unknown engine 'tpu'"):
        runners.runner("tpu")


def test_registered_runner_is_returned(monkeypatch):
    monkeypatch.setitem(runners.RUNNER_MODULES, "pytest", "specplug.runners")
    monkeypatch.setattr(runners, "_RUNNERS", {})
    calls = []
    runners.register_runner("pytest", calls.append)
    runners.runner("pytest")("cfg")  # `pytest` is importable here, as an engine must be
    assert calls == ["cfg"]


@pytest.mark.parametrize("engine", sorted(runners.RUNNER_MODULES))
def test_integrations_do_not_import_api(engine):
    """Every module of the integration, every import statement (top level or inside functions)."""
    for path in (REPO / "integrations" / engine).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "specplug.api" or n.endswith(".api") for n in names), path


def test_each_integration_registers_its_runner():
    for engine, module in runners.RUNNER_MODULES.items():
        path = REPO / "integrations" / engine / (module.rsplit(".", 1)[1] + ".py")
        assert f'register_runner("{engine}",' in path.read_text()
