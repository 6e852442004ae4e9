"""Fixtures shared by the engine tests."""
from __future__ import annotations

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def sglang_venv_python() -> str:
    """The SGLang venv's Python (built by the Makefile's install step; built here if missing)."""
    path = os.environ.get("SPECPLUG_SGLANG_PYTHON", os.path.join(REPO, ".venv-sglang", "bin", "python"))
    if not os.access(path, os.X_OK):
        install = os.path.join(REPO, "integrations", "sglang", "install_cpu.sh")
        subprocess.run(["bash", install, os.path.dirname(os.path.dirname(path))], check=True)
    return path
