"""Each drafter family declares its facts once (`FAMILY` in its own module); every other part of
specplug derives its method sets from those records."""
from __future__ import annotations

import importlib

import pytest

from specplug.drafters.base import BUILTIN_FAMILIES, available_methods, families, family_of


def test_every_family_is_declared_in_its_own_module():
    declared = {}
    for module in BUILTIN_FAMILIES:
        record = importlib.import_module(f"specplug.drafters.{module}").FAMILY
        declared[record.method] = record
    assert sorted(declared) == available_methods()
    assert {f.method: f for f in families()} == declared


def test_records_are_consistent():
    for f in families():
        if f.reads_hidden_states:  # SGLang's capture feeds them through specplug's worker
            assert f.sglang_plugin_name, f
        if f.sglang_needs_card:
            assert f.needs_weights and f.sglang_plugin_name, f
        if f.vllm_method or f.sglang_algorithm:  # engines' own families load checkpoints
            assert f.needs_weights, f


def test_derived_sets_follow_the_records():
    from specplug.drafters.detect import detect_method  # noqa: F401  (imports cleanly)
    from specplug.integrations.sglang import algorithms
    from specplug.integrations.vllm.generate import speculative_settings
    served = {m for m in algorithms.ALGORITHMS.values() if m}
    assert served == {f.method for f in families() if f.sglang_plugin_name}
    assert algorithms.SGLANG_BUILTINS == {"eagle": "EAGLE", "eagle3": "EAGLE3", "dflash": "DFLASH"}
    spec, extra = speculative_settings("eagle3", "/ckpt", {}, 3)
    assert spec["method"] == "eagle3" and not extra  # vLLM's own EAGLE-3 on the same checkpoint
    spec, extra = speculative_settings("suffix", None, {}, 3)
    assert spec["method"] == "custom_class" and extra["specplug"]["method"] == "suffix"


def test_unknown_method_is_one_line():
    with pytest.raises(ValueError, match="unknown method 'nope'; known: none, "):
        family_of("nope")


def test_gamma_defaults_to_the_methods_own():
    from specplug.drafters.base import gamma_for
    assert gamma_for("suffix", None) == family_of("suffix").default_gamma == 24
    assert gamma_for("ngram", None) == gamma_for("none", None) == gamma_for(None, None) == 5
    assert gamma_for("suffix", 3) == 3  # the user's wins
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        gamma_for("nope", None)


def test_on_off_options_reject_other_words():
    from specplug.drafters.base import option_is_set
    assert [option_is_set(v) for v in (True, 1, "on", "YES", "true")] == [True] * 5
    assert [option_is_set(v) for v in (False, 0, "off", "No", "false")] == [False] * 5
    for bad in ("maybe", "", "2", None):
        with pytest.raises(ValueError, match="budget must be on or off"):
            option_is_set(bad, "option budget")
