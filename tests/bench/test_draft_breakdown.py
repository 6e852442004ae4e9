"""benchmarks/draft_breakdown.py: each module's time inside a real decode adds up to no more than
the engine's draft time, and leaf linears are also timed alone."""
from __future__ import annotations

from specplug.benchmarks.draft_breakdown import breakdown


def test_breakdown_of_a_draft_model(tiny_models):
    got = breakdown(tiny_models["target"], "draft", tiny_models["draft"], {}, 1, 8, "float32")
    assert got["steps"] > 0 and got["prompts"] > 0  # prompts past the tiny context left out
    rows = {r["module"]: r for r in got["modules"]}
    stack = [r for name, r in rows.items() if name.startswith("DecoderStack") and "." not in name]
    assert stack and stack[0]["calls"] >= got["steps"]  # the draft model runs every step
    # the hooks sit inside the engine's draft clock: modules never add up to more than it
    assert 0 < stack[0]["ms_per_step"] <= got["draft_ms_per_step"]
    assert got["outside_modules_ms_per_step"] >= 0
    alone = [r for r in got["modules"] if "us_per_call_alone" in r]
    assert alone and all(r["us_per_call_alone"] > 0 and r["weights_mb"] > 0 for r in alone)
