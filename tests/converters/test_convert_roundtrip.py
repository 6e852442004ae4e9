"""Every source x target on tiny checkpoints: the output reads back to the same tensors, the
reference forward gives identical logits (--validate), and the configs carry what engines need."""
import json
import os

import pytest
import torch

import convert_fixtures as F
from specplug.converters import ConvertError, convert
from specplug.converters.fold import fold_fc_bias
from specplug.converters.sources import detect_source, read_source
from specplug.converters.validate import compare_states, read_back

BUILDERS = {
    "eagle": lambda d, ver: F.eagle1(d, fc_bias=False, embed_from=ver),
    "eagle3": lambda d, ver: F.eagle3(d),
    "specforge": lambda d, ver: F.specforge(d, embed_from=ver),
    "specforge-het": lambda d, ver: F.specforge_het(d),
    "dflash": lambda d, ver: F.dflash(d),
}
TARGETS = ("speculators", "sglang", "specplug")


@pytest.fixture(scope="module")
def ver(tmp_path_factory):
    return F.verifier(str(tmp_path_factory.mktemp("ver")))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", list(BUILDERS))
def test_round_trip(tmp_path, ver, source, target):
    src = BUILDERS[source](str(tmp_path / "src"), ver)
    assert detect_source(src) == source
    spec, before = read_source(src, source, {"verifier": ver})
    # EagleV2 always trains an fc bias and vLLM's EAGLE-1 fc has none: it is folded into layer 0
    # (test_convert_fold.py), exact to rounding; everything else is bit for bit
    folds = (source, target) == ("specforge-het", "speculators")
    if folds:
        spec, before = fold_fc_bias(spec, before)
    dst = str(tmp_path / "out")
    res = convert(src, dst, "auto", target, verifier=ver, validate=True, max_shard_bytes=20_000)
    assert res.folded_fc_bias == folds
    assert (res.max_abs_logit_diff > 0.0) if folds else (res.max_abs_logit_diff == 0.0)
    assert len([f for f in os.listdir(dst) if f.endswith(".safetensors")]) > 1  # sharded + index
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))
    new_spec, after = read_back(dst, target, spec.family)
    compare_states(before, after, dst)  # raises on any tensor or dtype difference
    assert new_spec.family == spec.family and new_spec.hidden_size == spec.hidden_size
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]  # no staging left


def test_speculators_eagle3_config_fields(tmp_path, ver):
    src = F.eagle3(str(tmp_path / "src"))
    convert(src, str(tmp_path / "out"), "eagle3", "speculators", verifier=ver)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["norm_before_residual"] is False  # written even though False (vLLM defaults True)
    assert cfg["draft_vocab_size"] == 48
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 3, 4]  # eagle_config ids [1, 2, 3] + 1
    assert cfg["transformer_layer_config"]["vocab_size"] == F.V
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == os.path.abspath(ver)
    from safetensors.torch import load_file
    st = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert st["d2t"].dtype == torch.int64 and st["t2d"].dtype == torch.bool
    assert "layers.0.hidden_norm.weight" in st and not any(k.startswith("midlayer.") for k in st)


def test_speculators_dflash_layer_offset_and_verifier_head(tmp_path, ver):
    src = F.dflash(str(tmp_path / "src"), layer_ids=(0, 2), block_top_level=True)
    convert(src, str(tmp_path / "out"), "dflash", "speculators", verifier=ver)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["aux_hidden_state_layer_ids"] == [1, 3]  # z-lab reads hidden_states[id + 1]
    assert cfg["block_size"] == 4 and cfg["mask_token_id"] == F.V - 1
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    from specplug.checkpoint_io import load_state_dict
    st, vst = load_state_dict(str(tmp_path / "out")), load_state_dict(ver)
    assert torch.equal(st["embed_tokens.weight"], vst["model.embed_tokens.weight"])


def test_a_verifier_with_tied_embeddings_gives_both_tensors(tmp_path):
    """SmolLM2 ties lm_head to the embedding (no lm_head key): the output still has both."""
    from specplug.models.tiny import build_tiny_llama
    model = build_tiny_llama(0, dtype=torch.float32, vocab_size=F.V, hidden=F.H, layers=4,
                             heads=F.HEADS, kv_heads=F.KV)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    tied = str(tmp_path / "tied")
    model.save_pretrained(tied, safe_serialization=True)
    src = F.dflash(str(tmp_path / "src"), layer_ids=(0, 2), block_top_level=True)
    convert(src, str(tmp_path / "out"), "dflash", "speculators", verifier=tied)
    from specplug.checkpoint_io import load_state_dict
    st = load_state_dict(str(tmp_path / "out"))
    assert torch.equal(st["lm_head.weight"], st["embed_tokens.weight"])
    assert torch.equal(st["embed_tokens.weight"], model.model.embed_tokens.weight)


def test_sglang_layouts(tmp_path, ver):
    e1 = F.eagle1(str(tmp_path / "e1"), fc_bias=False, qwen2=True, embed_from=ver)
    convert(e1, str(tmp_path / "o1"), "eagle", "sglang", verifier=ver)
    cfg = json.load(open(tmp_path / "o1" / "config.json"))
    assert cfg["architectures"] == ["Qwen2ForCausalLMEagle"]
    from specplug.checkpoint_io import load_state_dict
    st = load_state_dict(str(tmp_path / "o1"))
    assert "embed_tokens.weight" not in st and not bool(st["fc.bias"].any())  # zeros, not SGLang's random init
    sf = F.specforge(str(tmp_path / "sf"), embed_from=ver)
    convert(sf, str(tmp_path / "o3"), "specforge", "sglang")
    st = load_state_dict(str(tmp_path / "o3"))
    assert all(not k.startswith(("draft_model.", "embed")) for k in st) and "midlayer.hidden_norm.weight" in st
    assert json.load(open(tmp_path / "o3" / "config.json"))["architectures"] == ["LlamaForCausalLMEagle3"]


def test_sources_in_bin_and_sharded_form(tmp_path):
    a = read_source(F.eagle1(str(tmp_path / "a"), qwen2=True), "eagle")
    b = read_source(F.eagle1(str(tmp_path / "b"), qwen2=True, fmt="bin"), "eagle")
    c = read_source(F.eagle1(str(tmp_path / "c"), qwen2=True, shards=3), "eagle")
    assert a[0].qkv_bias and a[0].fc_bias
    for other in (b, c):
        compare_states(a[1], other[1], "bin/sharded")


def test_specforge_takes_newest_epoch_and_vocab_map_beside(tmp_path):
    src = F.specforge(str(tmp_path / "sf"))
    spec, st = read_source(src, "specforge")
    assert float(st["fc.weight"].abs().sum()) > 0  # epoch_1, not the zeroed epoch_0
    assert spec.draft_vocab_size == 48 and int(st["t2d"].sum()) == 48


def test_engine_refusals_name_the_reason(tmp_path):
    het = F.specforge_het(str(tmp_path / "het"), drafter="Qwen3Drafter")
    with pytest.raises(ConvertError, match="Qwen3"):
        convert(het, str(tmp_path / "o"), "specforge-het", "sglang")
    assert not os.path.exists(tmp_path / "o")
