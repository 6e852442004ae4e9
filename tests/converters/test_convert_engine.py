"""Converted drafters propose the same tokens as the originals in the embedded engine: same
outputs, same accept lengths per step (specplug's own EAGLE-1 and DFlash loaders on both; the
speculators DFlash output through specplug.drafters.speculators_format).  EAGLE-3:
test_convert_eagle3_engine.py."""
import pytest
import torch

import convert_fixtures as F
from specplug.converters import convert
from specplug.models.loading import load_causal_lm


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = F.verifier(str(tmp_path_factory.mktemp("target")))
    model = load_causal_lm(folder, dtype=torch.float32)
    return folder, model


def _run(model, method, path):
    """-> every proposal's draft tokens, then each request's output and accept lengths."""
    return F.record_proposals(model, method, path)


@pytest.mark.parametrize("to", ["specplug", "sglang", "speculators"])
def test_eagle1_converted_drafts_the_same(tmp_path, target, to):
    folder, model = target
    # the speculators (vLLM) EAGLE-1 layout has no fc bias; SGLang's gets explicit zeros
    src = F.eagle1(str(tmp_path / "src"), fc_bias=to != "speculators", embed_from=folder)
    convert(src, str(tmp_path / "out"), "eagle", to, verifier=folder)
    assert _run(model, "eagle", src) == _run(model, "eagle", str(tmp_path / "out"))


@pytest.mark.parametrize("to", ["specplug", "sglang", "speculators"])
def test_dflash_converted_drafts_the_same(tmp_path, target, to):
    folder, model = target
    src = F.dflash(str(tmp_path / "src"), block_top_level=True)
    convert(src, str(tmp_path / "out"), "dflash", to, verifier=folder)
    assert _run(model, "dflash", src) == _run(model, "dflash", str(tmp_path / "out"))


def test_specforge_het_converted_drafts_like_its_eagle_key_map(tmp_path, target):
    """The het EagleV2 head, converted, loads in specplug's EAGLE-1 drafter and drafts the same in
    SGLang and specplug layouts."""
    folder, model = target
    src = F.specforge_het(str(tmp_path / "src"))
    for to in ("specplug", "sglang"):
        convert(src, str(tmp_path / to), "specforge-het", to, verifier=folder)
    assert _run(model, "eagle", str(tmp_path / "specplug")) == _run(model, "eagle", str(tmp_path / "sglang"))
