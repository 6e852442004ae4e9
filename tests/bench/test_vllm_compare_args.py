"""benchmarks/vllm_compare.py's command line, without an engine."""
from __future__ import annotations

from specplug.benchmarks import vllm_compare


def test_relative_folders_reach_the_sessions_absolute(tmp_path, monkeypatch):
    """The engine sessions run in a temporary folder: a --draft given relative to the caller's
    folder must reach them as an absolute path (it once failed with 'model path not found')."""
    (tmp_path / "models" / "draft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vllm_compare, "target_prompts", lambda *a: [[1, 2]])
    seen = {}

    def fake_compare(target, draft, *rest):
        seen.update(target=target, draft=draft)
        return {"pairs": {}}

    monkeypatch.setattr(vllm_compare, "compare", fake_compare)
    assert vllm_compare.main(["--target", "models/draft", "--draft", "models/draft",
                              "--mtbench", "1", "--out", str(tmp_path / "o.json")]) == 0
    folder = str(tmp_path / "models" / "draft")
    assert seen == {"target": folder, "draft": folder}
