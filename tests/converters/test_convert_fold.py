"""EAGLE-1 with a nonzero fc.bias into vLLM's layout, whose EAGLE fc has no bias: the bias is
folded into layer 0's q/k/v biases and an o_proj bias (converters/fold.py).  Checked three ways:
--validate (the converter's reference forward, float64, to rounding), an independent forward
through HF's LlamaDecoderLayer set up as vLLM's EAGLE layer 0 (no input_layernorm, q/k/v and
o_proj biases from `qkv_bias` / `attention_bias`), and a deliberately wrong fold that
--validate must reject with DST untouched."""
import json
import os

import pytest
import torch

import convert_fixtures as F
from specplug.checkpoint_io import load_state_dict
from specplug.converters import ConvertError, convert
from specplug.converters import fold as fold_module
from specplug.converters.fold import fold_fc_bias
from specplug.converters.sources import read_eagle


@pytest.fixture(scope="module")
def ver(tmp_path_factory):
    return F.verifier(str(tmp_path_factory.mktemp("ver")))


def _retype(folder: str, dtype: torch.dtype) -> str:
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path)
    return folder


@pytest.mark.parametrize("layers,qwen2", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fold_validates_and_writes_what_vllm_reads(tmp_path, ver, layers, qwen2, dtype):
    src = _retype(F.eagle1(str(tmp_path / "src"), layers=layers, qwen2=qwen2), dtype)
    spec, before = read_eagle(src)
    assert bool(before["fc.bias"].any())
    res = convert(src, str(tmp_path / "out"), "eagle", "speculators", validate=True)
    assert res.folded_fc_bias and 0.0 < res.max_abs_logit_diff  # to rounding, not bit for bit
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    # vLLM's Llama layer: q/k/v biases from qkv_bias, o_proj's from attention_bias (every layer)
    assert cfg["attention_bias"] is True and cfg["qkv_bias"] is True
    assert cfg["model_type"] == ("qwen2" if qwen2 else "llama") and cfg["architectures"] == ["LlamaForCausalLM"]
    st = load_state_dict(str(tmp_path / "out"))
    assert "fc.bias" not in st
    assert torch.equal(st["layers.0.self_attn.o_proj.bias"], before["fc.bias"])
    for i in range(1, layers):
        assert not bool(st[f"layers.{i}.self_attn.o_proj.bias"].any())
        assert not qwen2 and not bool(st[f"layers.{i}.self_attn.q_proj.bias"].any())
    for proj in ("q_proj", "k_proj", "v_proj"):
        w, b = before[f"layers.0.self_attn.{proj}.weight"].double(), before["fc.bias"].double()
        old = before.get(f"layers.0.self_attn.{proj}.bias", torch.zeros(w.shape[0], dtype=dtype)).double()
        assert torch.equal(st[f"layers.0.self_attn.{proj}.bias"], (old + w @ b).to(dtype))
        assert st[f"layers.0.self_attn.{proj}.bias"].dtype == dtype
    # the folded head reads back as itself (a second conversion would see the same tensors)
    spec2, again = read_eagle(str(tmp_path / "out"))
    assert spec2.attn_o_bias and spec2.arch == spec.arch and set(again) == set(st)


def _vllm_layer0(state: dict, spec):
    """HF's LlamaDecoderLayer as vLLM's EAGLE layer 0: input_layernorm replaced by Identity."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    cfg = LlamaConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                      head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps, attention_bias=True,
                      rope_theta=spec.rope_theta)
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, 0).double()
    weights = {k[len("layers.0."):]: v.double() for k, v in state.items() if k.startswith("layers.0.")}
    for proj, width in (("q_proj", spec.num_heads), ("k_proj", spec.num_kv_heads), ("v_proj", spec.num_kv_heads)):
        weights.setdefault(f"self_attn.{proj}.bias", torch.zeros(width * spec.head_dim, dtype=torch.float64))
    weights.setdefault("self_attn.o_proj.bias", torch.zeros(spec.hidden_size, dtype=torch.float64))
    weights["input_layernorm.weight"] = torch.ones(spec.hidden_size, dtype=torch.float64)
    layer.load_state_dict(weights, strict=True)
    layer.input_layernorm = torch.nn.Identity()
    return layer


@pytest.mark.parametrize("qwen2", [False, True])
def test_folded_layer_matches_in_an_independent_forward(tmp_path, qwen2):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    spec, st = read_eagle(F.eagle1(str(tmp_path / "src"), qwen2=qwen2))
    st = {k: v.double() for k, v in st.items()}
    folded_spec, folded = fold_fc_bias(spec, st)
    g = torch.Generator().manual_seed(5)
    T = 6
    cat = torch.randn(1, T, 2 * spec.hidden_size, generator=g, dtype=torch.float64)  # [emb; h]
    x = cat @ st["fc.weight"].T  # [1, T, H]: fc without its bias
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
                                            head_dim=spec.head_dim, rope_theta=spec.rope_theta))
    pos = torch.arange(T)[None]
    cos_sin = rope(x, pos)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        original = _vllm_layer0(st, spec)(x + st["fc.bias"], attention_mask=mask,
                                                      position_embeddings=cos_sin, position_ids=pos)
        rewritten = _vllm_layer0(folded, folded_spec)(x, attention_mask=mask,
                                                                position_embeddings=cos_sin, position_ids=pos)
    original = original[0] if isinstance(original, tuple) else original
    rewritten = rewritten[0] if isinstance(rewritten, tuple) else rewritten
    assert (original - rewritten).abs().max() <= 1e-12 * original.abs().max()
    # control: the same layer without the fc bias anywhere is far off
    with torch.no_grad():
        plain = _vllm_layer0(st, spec)(x, attention_mask=mask, position_embeddings=cos_sin,
                                                   position_ids=pos)
    plain = plain[0] if isinstance(plain, tuple) else plain
    assert (original - plain).abs().max() > 1e-3 * original.abs().max()


def test_validate_rejects_a_wrong_fold(tmp_path, monkeypatch):
    """A fold that forgets the residual (no o_proj bias) is caught by --validate: one-line error,
    nothing written."""
    src = F.eagle1(str(tmp_path / "src"))
    real = fold_module.fold_fc_bias

    def forgetful(spec, state):
        folded_spec, folded = real(spec, state)
        return folded_spec, {**folded, "layers.0.self_attn.o_proj.bias": torch.zeros_like(state["fc.bias"])}
    monkeypatch.setattr("specplug.converters.convert.fold_fc_bias", forgetful)
    with pytest.raises(ConvertError, match="drafter logits differ after conversion") as err:
        convert(src, str(tmp_path / "out"), "eagle", "speculators", validate=True)
    assert "\n" not in str(err.value) and not os.path.exists(tmp_path / "out")


def test_zero_bias_is_dropped_not_folded(tmp_path):
    """The layout of a head whose fc.bias is zero (or absent) stays plain: no biases added."""
    src = F.eagle1(str(tmp_path / "src"))
    from safetensors.torch import load_file, save_file
    path = os.path.join(src, "model.safetensors")
    st = load_file(path)
    st["fc.bias"].zero_()
    save_file(st, path)
    res = convert(src, str(tmp_path / "out"), "eagle", "speculators", validate=True)
    assert not res.folded_fc_bias and res.max_abs_logit_diff == 0.0
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["attention_bias"] is False and "qkv_bias" not in cfg
    assert not any(k.endswith(".bias") for k in load_state_dict(str(tmp_path / "out")))


def test_a_folded_head_is_not_written_where_o_proj_has_no_bias(tmp_path):
    convert(F.eagle1(str(tmp_path / "src")), str(tmp_path / "vllm"), "eagle", "speculators")
    for to in ("sglang", "specplug"):
        with pytest.raises(ConvertError, match="no o_proj bias"):
            convert(str(tmp_path / "vllm"), str(tmp_path / to), "eagle", to)
        assert not os.path.exists(tmp_path / to)
