"""specplug's one decoder layer (specplug/drafters/decoder_layer.py) against HF's own layers on
the same weights: Qwen2 with q/k/v biases and grouped KV heads, Qwen3 with q/k norms, Llama with
a scaled rope.  Every EAGLE/EAGLE-3/DFlash/SpecDiff head is built from this layer, so a wrong norm, rope
or head grouping here would show as a drafter that drafts badly but stays lossless."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from specplug.drafters.decoder_layer import DecoderLayer, LayerShape, Ragged, RMSNorm, Rope

BASE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "rms_norm_eps": 1e-6, "max_position_embeddings": 256}
CASES = {
    # q/k/v biases (Qwen2 and Dream; o_proj has none), grouped KV heads
    "qwen2-bias-gqa": (Qwen2Config, Qwen2DecoderLayer, {"attention_bias": True}, False),
    "qwen3-qk-norm": (Qwen3Config, Qwen3DecoderLayer, {"head_dim": 32}, True),
    "llama3-scaled-rope": (LlamaConfig, LlamaDecoderLayer, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, False),
}


def _pair(case: str, dtype: torch.dtype):
    config_cls, layer_cls, extra, qk_norm = CASES[case]
    cfg = {**BASE, **extra}
    hf_cfg = config_cls(**cfg)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = layer_cls(hf_cfg, layer_idx=0).to(dtype).eval()
    with torch.no_grad():  # HF initialises norms to ones: perturb them so a skipped norm shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    ours = DecoderLayer(LayerShape.from_config(cfg, qk_norm=qk_norm)).to(dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, LlamaRotaryEmbedding(hf_cfg), ours, Rope.from_config(cfg)


@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_hf_on_the_same_weights(case):
    hf, hf_rope, ours, rope = _pair(case, torch.float32)
    b, q = 2, 7
    x = torch.randn(b, q, BASE["hidden_size"])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [90, 91, 92, 93, 94, 95, 96]])
    causal = torch.ones(q, q, dtype=torch.bool).tril().expand(b, q, q)
    additive = torch.zeros(b, 1, q, q).masked_fill(~causal[:, None], float("-inf"))
    with torch.no_grad():
        want = hf(x, attention_mask=additive, position_ids=positions,
                  position_embeddings=hf_rope(x, positions))
        want = want[0] if isinstance(want, tuple) else want
        got = ours(x, rope(x, positions), causal, lambda k, v: (k, v))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["qwen2-bias-gqa", "qwen3-qk-norm"])
def test_packed_real_entries_give_the_padded_block_s_outputs(case):
    """Rows fed 5, 2 and 0 tokens in a block of 5: the layer run on the packed real entries
    (Ragged) equals the padded run on those entries, and the keys/values it hands the cache
    equal the padded run's at every real entry."""
    _, _, ours, rope = _pair(case, torch.float32)
    b, q = 3, 5
    real = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    x = torch.randn(b, q, BASE["hidden_size"])
    positions = torch.arange(q).expand(b, q) + torch.tensor([[0], [40], [7]])
    mask = torch.ones(q, q, dtype=torch.bool).tril() & real[:, None, :]
    mask = mask | torch.eye(q, dtype=torch.bool)  # padding sees itself
    written = {}

    def record(name):
        def extend(k, v):
            written[name] = (k, v)
            return k, v
        return extend

    ragged = Ragged.from_counts([5, 2, 0], q, "cpu")  # what the EAGLE catch-up hands over
    assert torch.equal(ragged.index, Ragged.from_mask(real).index)
    with torch.no_grad():
        padded = ours(x, rope(x, positions), mask, record("padded"))
        packed = ours(ragged.pack(x), rope(x, positions), mask, record("packed"), ragged)
    assert packed.shape == (int(real.sum()), BASE["hidden_size"])
    torch.testing.assert_close(ragged.unpack(packed)[real], padded[real], atol=1e-5, rtol=1e-5)
    for i in range(2):  # keys, values [b, kv_heads, q, head_dim]
        got, want = written["packed"][i], written["padded"][i]
        torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-5)


def test_rmsnorm_upcasts_like_hf_in_bfloat16():
    torch.manual_seed(1)
    x = (torch.randn(4, 64) * 30).bfloat16()
    ours, hf = RMSNorm(64, 1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64))
        hf.weight.copy_(ours.weight)
    ours, hf = ours.bfloat16(), hf.bfloat16()
    assert torch.equal(ours(x), hf(x))
    # the statistic in bf16 itself (what a norm without the upcast computes) differs
    naive = ours.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert not torch.equal(naive, hf(x))
