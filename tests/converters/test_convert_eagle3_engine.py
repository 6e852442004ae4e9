"""EAGLE-3 conversions in the embedded engine and the aux-layer key each consumer reads.

Aux layers are HF hidden_states indices in the canonical spec.  Consumers read them so:
  * vLLM: the speculators top-level `eagle_aux_hidden_state_layer_ids` (copied by
    `update_eagle3`), collected as `hidden_states + residual` before layer id: index = id;
  * SGLang: `eagle_config.eagle_aux_hidden_state_layer_ids`, captured before layer id + 1
    (`set_eagle3_layers_to_capture`): index = id + 1;
  * specplug: `specplug.drafters.eagle3.aux_hidden_indices` (either key, same conventions).
"""
import json
import os
import sys

import pytest
import torch

import convert_fixtures as F
from specplug.converters import ConvertError, convert
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.eagle3 import aux_hidden_indices
from specplug.models.loading import load_causal_lm, target_info

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "drafters"))
import eagle_fixtures as E  # noqa: E402  (the attention-only target and its reproducing head)

TARGETS = ("specplug", "sglang", "speculators")


def vllm_aux(cfg: dict) -> list[int] | None:
    return cfg.get("eagle_aux_hidden_state_layer_ids")


def sglang_aux(cfg: dict) -> list[int] | None:
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [i + 1 for i in ids] if ids else None


def _cfg(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = F.verifier(str(tmp_path_factory.mktemp("target")))
    return folder, load_causal_lm(folder, dtype=torch.float32)


def _proposals(model, path: str, method: str = "eagle3"):
    """Every proposal's draft tokens, then each request's output and accept lengths."""
    return F.record_proposals(model, method, path)


# -- the aux-layer key, per consumer ------------------------------------------------------------
AUX_SOURCES = {  # how the source config names hidden_states [2, 3, 4] of the 4-layer target
    "eagle_config": {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}},
    "top-level": {"eagle_aux_hidden_state_layer_ids": [2, 3, 4]},
    "both": {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]},
             "eagle_aux_hidden_state_layer_ids": [2, 3, 4]},
}


@pytest.mark.parametrize("naming", list(AUX_SOURCES))
def test_each_consumer_reads_the_same_aux_layers(tmp_path, target, naming):
    folder, _ = target
    cfg = {**F.eagle3_cfg(), **AUX_SOURCES[naming]}
    src = F.save(str(tmp_path / "src"), cfg, F.eagle3_state())
    assert aux_hidden_indices(cfg, 4) == (2, 3, 4)
    for to in TARGETS:
        convert(src, str(tmp_path / to), "eagle3", to, verifier=folder)
    assert vllm_aux(_cfg(str(tmp_path / "speculators"))) == [2, 3, 4]
    assert sglang_aux(_cfg(str(tmp_path / "sglang"))) == [2, 3, 4]
    for to in TARGETS:  # and specplug reads every output the same way
        assert aux_hidden_indices(_cfg(str(tmp_path / to)), 4) == (2, 3, 4), to


def test_no_aux_key_stays_absent_so_every_default_agrees(tmp_path, target):
    folder, _ = target
    src = F.save(str(tmp_path / "src"), F.eagle3_cfg(), F.eagle3_state())
    for to in TARGETS:
        cfg = _cfg(convert(src, str(tmp_path / to), "eagle3", to, verifier=folder).dst)
        assert vllm_aux(cfg) is None and sglang_aux(cfg) is None  # [2, L // 2, L - 3] everywhere
        assert aux_hidden_indices(cfg, 4) == (2, 2, 1)


def test_contradicting_aux_keys_are_refused(tmp_path):
    cfg = {**F.eagle3_cfg(), "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]},
           "eagle_aux_hidden_state_layer_ids": [1, 2, 3]}
    src = F.save(str(tmp_path / "src"), cfg, F.eagle3_state())
    with pytest.raises(ConvertError, match="name different target layers"):
        convert(src, str(tmp_path / "out"), "eagle3", "speculators")
    assert not os.path.exists(tmp_path / "out")


# -- proposals in the embedded engine -----------------------------------------------------------
@pytest.mark.parametrize("to", TARGETS)
def test_eagle3_converted_drafts_the_same(tmp_path, target, to):
    folder, model = target
    src = F.eagle3(str(tmp_path / "src"))  # eagle_config ids [1, 2, 3]: hidden_states [2, 3, 4]
    dst = convert(src, str(tmp_path / "out"), "eagle3", to, verifier=folder).dst
    assert _proposals(model, src) == _proposals(model, dst)


def test_the_engine_check_sees_a_shifted_aux_layer(tmp_path, target):
    """Control: the speculators output with the eagle_config ids copied unshifted (what a
    converter that ignores the conventions writes) drafts differently."""
    folder, model = target
    src = F.eagle3(str(tmp_path / "src"))
    dst = convert(src, str(tmp_path / "out"), "eagle3", "speculators", verifier=folder).dst
    cfg = _cfg(dst)
    cfg["eagle_aux_hidden_state_layer_ids"] = [1, 2, 3]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert _proposals(model, src)[0] != _proposals(model, dst)[0]


@pytest.fixture(scope="module")
def attention_only(tmp_path_factory):
    model = E.attention_only_target(0)
    folder = str(tmp_path_factory.mktemp("attn_target"))
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("to,norm_before_residual",
                         [("specplug", False), ("sglang", False), ("speculators", False),
                          ("specplug", True), ("speculators", True)])
def test_accept_counts_survive_conversion(tmp_path, attention_only, to, norm_before_residual):
    """A noisy copy of the reproducing head (some drafts accepted, some not): outputs equal to
    the target alone, and the same accept length at every step before and after conversion."""
    folder, model = attention_only
    state, cfg = E.eagle3_state(model, [0, 1, 1], noise=0.05, draft_vocab=200, id_key="eagle_config")
    cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [-1, 0, 0]  # hidden_states [0, 1, 1]
    cfg["norm_before_residual"] = norm_before_residual
    src = E.save_head(str(tmp_path / "src"), state, cfg)
    if to == "speculators":
        # vLLM de-duplicates aux ids, so a head reading one layer twice cannot load there
        # (distinct-id heads are run in real vLLM by tests/engines/test_vllm_converted.py)
        with pytest.raises(ConvertError, match="repeat a layer"):
            convert(src, str(tmp_path / "out"), "eagle3", to, verifier=folder)
        assert not (tmp_path / "out").exists()
        return
    dst = convert(src, str(tmp_path / "out"), "eagle3", to, verifier=folder).dst
    prompts = E.bos_prompts(6, seed=1)
    plain, _ = E.run(model, None, prompts, 2, max_new=16)
    runs = []
    for path in (src, dst):
        drafter = build_drafter(DrafterSpec("eagle3", path), target_info(model))
        outs, stats = E.run(model, drafter, prompts, 2, max_new=16)
        assert outs == plain
        runs.append((stats.accept_lengths, stats.num_draft_tokens, stats.num_accepted_tokens))
    assert runs[0] == runs[1]
    assert runs[0][2] > 5  # drafts do get accepted: the counts compare something
