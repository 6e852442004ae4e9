"""benchmarks/vllm_compare.py's engine jobs, without an engine."""
from __future__ import annotations

import pytest

from specplug.benchmarks import vllm_compare


class _Captured(Exception):
    pass


def test_relative_folders_reach_the_sessions_absolute(tmp_path, monkeypatch):
    """The engine sessions run in a temporary folder: a --draft given relative to the caller's
    folder must reach them as an absolute path (it once failed with 'model path not found')."""
    (tmp_path / "models" / "draft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_interleaved(arms, base_job, *rest):  # what the sessions would be opened with
        seen.update(arms=arms, base_job=base_job)
        raise _Captured

    monkeypatch.setattr(vllm_compare, "_interleaved", fake_interleaved)
    with pytest.raises(_Captured):
        vllm_compare.compare("models/draft", "models/draft", [[1, 2]], 4, 8, 3,
                             str(tmp_path / "work"), False, only=["draft"])
    folder = str(tmp_path / "models" / "draft")
    assert seen["base_job"]["target"] == folder
    assert seen["arms"]["draft-specplug"]["specplug"]["path"] == folder
    assert seen["arms"]["draft-vllm"]["speculative_config"]["model"] == folder
