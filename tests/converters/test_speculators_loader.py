"""specplug loads the speculators format (what vLLM loads natively): native -> speculators ->
the embedded engine proposes the same tokens, the family is detected from the config, vLLM's
defaults for absent fields are followed, and what specplug's heads cannot run is refused."""
import json
import os

import pytest
import torch

import convert_fixtures as F
from specplug.checkpoint_io import CheckpointError
from specplug.converters import convert
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.detect import detect_method
from specplug.drafters.speculators_format import native_config
from specplug.models.loading import load_causal_lm, target_info


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = F.verifier(str(tmp_path_factory.mktemp("target")))
    return folder, load_causal_lm(folder, dtype=torch.float32)


def _run(model, path: str):
    """Proposals and outputs with the method detected from the folder (as `specplug generate
    --drafter PATH` without --method does)."""
    return F.record_proposals(model, detect_method(path), path)


def _edit(folder: str, fn) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_dflash_speculators_drafts_like_the_z_lab_original(tmp_path, target):
    folder, model = target
    src = F.dflash(str(tmp_path / "src"), layer_ids=(1, 3), layers=2)
    dst = convert(src, str(tmp_path / "spec"), "dflash", "speculators", verifier=folder).dst
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["aux_hidden_state_layer_ids"] == [2, 4] and "dflash_config" not in cfg
    assert detect_method(dst) == "dflash"
    assert native_config(cfg, dst)["dflash_config"]["target_layer_ids"] == [1, 3]
    assert _run(model, src) == _run(model, dst)


def test_dflash_block_size_from_the_proposal_method(tmp_path, target):
    """The speculators library states the draft length in speculators_config; block = it + 1."""
    folder, model = target
    src = F.dflash(str(tmp_path / "src"))
    dst = convert(src, str(tmp_path / "spec"), "dflash", "speculators", verifier=folder).dst
    _edit(dst, lambda c: c.pop("block_size"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert native_config(cfg, dst)["dflash_config"]["block_size"] == 4
    assert _run(model, src) == _run(model, dst)


def test_eagle3_speculators_drafts_like_the_specforge_original(tmp_path, target):
    folder, model = target
    src = F.eagle3(str(tmp_path / "src"))
    dst = convert(src, str(tmp_path / "spec"), "eagle3", "speculators", verifier=folder).dst
    assert detect_method(dst) == "eagle3"
    assert _run(model, src) == _run(model, dst)


def test_absent_norm_before_residual_means_true_as_in_vllm(tmp_path, target):
    folder, model = target
    src = F.save(str(tmp_path / "src"), F.eagle3_cfg(aux=[1, 2, 3], norm_before_residual=True), F.eagle3_state())
    dst = convert(src, str(tmp_path / "spec"), "eagle3", "speculators", verifier=folder).dst
    _edit(dst, lambda c: c.pop("norm_before_residual"))
    assert native_config(json.load(open(os.path.join(dst, "config.json"))), dst)["norm_before_residual"] is True
    assert _run(model, src) == _run(model, dst)
    _edit(dst, lambda c: c.__setitem__("norm_before_residual", False))  # control: it matters
    assert _run(model, src)[0] != _run(model, dst)[0]


def _speculators_eagle3(tmp_path, target) -> str:
    folder, _ = target
    return convert(F.eagle3(str(tmp_path / "src")), str(tmp_path / "spec"), "eagle3", "speculators",
                   verifier=folder).dst


REFUSALS = [  # (family, config edit, expected text)
    ("eagle3", lambda c: c.__setitem__("speculators_model_type", "eagle"), "speculators_model_type 'eagle' has no specplug loader"),
    ("eagle3", lambda c: c.__setitem__("norm_before_fc", True), "norm_before_fc=true is not supported"),
    ("eagle3", lambda c: c["transformer_layer_config"].__setitem__("model_type", "qwen3"), "model_type 'qwen3' is not supported"),
    ("eagle3", lambda c: c.pop("transformer_layer_config"), "no transformer_layer_config"),
    ("dflash", lambda c: c.pop("aux_hidden_state_layer_ids"), "needs aux_hidden_state_layer_ids"),
    ("dflash", lambda c: c.__setitem__("draft_vocab_size", 32), "reduced draft vocabulary is not supported"),
    ("dflash", lambda c: c["transformer_layer_config"].__setitem__("layer_types", ["sliding_attention"] * 2),
     "only full_attention"),
]


@pytest.mark.parametrize("family,edit,expected", REFUSALS, ids=[r[2][:30] for r in REFUSALS])
def test_what_specplug_cannot_run_is_refused_by_name(tmp_path, target, family, edit, expected):
    folder, model = target
    if family == "eagle3":
        dst = _speculators_eagle3(tmp_path, target)
    else:
        dst = convert(F.dflash(str(tmp_path / "src")), str(tmp_path / "spec"), "dflash", "speculators",
                      verifier=folder).dst
    _edit(dst, edit)
    with pytest.raises(CheckpointError, match=expected) as err:
        build_drafter(DrafterSpec(family, dst), target_info(model))
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


def test_detect_names_an_unknown_speculators_type(tmp_path, target):
    dst = _speculators_eagle3(tmp_path, target)
    _edit(dst, lambda c: c.__setitem__("speculators_model_type", "mlp"))
    with pytest.raises(CheckpointError, match="'mlp' has no specplug loader"):
        detect_method(dst)


def test_native_configs_pass_through_unchanged(tmp_path):
    cfg = F.eagle3_cfg(aux=[1, 2, 3])
    assert native_config(cfg, str(tmp_path)) is cfg
