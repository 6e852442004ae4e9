"""PackedLinear: the oneDNN-packed CPU linear computes what nn.Linear does, follows its weight's
changes, leaves autograd alone, and is switched in without breaking tied weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specplug.models.packed_linear import PackedLinear, pack_linears, packing_works

pytestmark = pytest.mark.skipif(not packing_works(torch.float32),
                                reason="this torch build has no oneDNN packed linear")


def _linear(dtype, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 96, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_outputs_are_bit_identical_to_nn_linear(bias):
    if not packing_works(torch.bfloat16):
        pytest.skip("no bf16 oneDNN on this CPU")
    layer = _linear(torch.bfloat16, bias)
    x = torch.randn(5, 7, 64).to(torch.bfloat16)  # [batch, q, in]
    with torch.inference_mode():
        want = F.linear(x, layer.weight, layer.bias)
        assert pack_linears(layer) == 1 and type(layer) is PackedLinear
        got = layer(x)
    assert got.shape == want.shape and torch.equal(got, want)


def test_fp32_is_close_and_a_row_does_not_depend_on_its_batch():
    layer = _linear(torch.float32, bias=True)
    x = torch.randn(300, 64)
    want = F.linear(x, layer.weight, layer.bias)
    pack_linears(layer)
    with torch.inference_mode():
        got = layer(x)
        alone = [layer(x[:1]), layer(x[:6]), layer(x[:37])]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # a verify block and a plain step must give a token the same logits
    for part in alone:
        assert torch.equal(part[0], got[0])


def test_a_weight_changed_in_place_or_reloaded_is_packed_again():
    layer = _linear(torch.float32)
    pack_linears(layer)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with torch.inference_mode():
        assert torch.allclose(layer(x), 2 * before, atol=1e-4)
    fresh = _linear(torch.float32, seed=1)
    layer.load_state_dict(fresh.state_dict())
    with torch.inference_mode():
        assert torch.allclose(layer(x), fresh(x), atol=1e-4)


def test_a_packed_layer_can_be_copied_and_pickled():
    import copy
    import io
    layer = _linear(torch.float32)
    pack_linears(layer)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        want = layer(x)  # packs
        twin = copy.deepcopy(layer)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(twin(x), want) and torch.equal(loaded(x), want)


def test_autograd_still_reaches_the_weight():
    layer = _linear(torch.float32)
    pack_linears(layer)
    layer(torch.randn(4, 64)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_tied_weights_stay_tied_and_other_dtypes_stay_plain():
    model = nn.Module()
    model.embed = nn.Embedding(96, 64)
    model.head = nn.Linear(64, 96, bias=False)
    model.head.weight = model.embed.weight  # tied, as SmolLM2's lm_head
    model.half_precision = nn.Linear(64, 8).to(torch.float16)
    assert pack_linears(model) == 1
    assert isinstance(model.head, nn.Linear) and model.head.weight is model.embed.weight
    assert type(model.half_precision) is nn.Linear  # float16: not packed
    with torch.inference_mode():
        h = torch.randn(2, 64)
        assert torch.allclose(model.head(h), h @ model.embed.weight.T, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packing_fuses_the_layers_drafters_are_built_from(dtype):
    """pack_linears (what build_drafter and the engine run on a drafter) gives every DecoderLayer
    one q/k/v and one gate/up product, with the separate linears' results."""
    import copy

    from specplug.drafters.decoder_layer import DecoderLayer, LayerShape
    if not packing_works(dtype):
        pytest.skip(f"no oneDNN packed linear for {dtype} here")
    torch.manual_seed(0)
    shape = LayerShape(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96,
                       attn_bias=True)
    layer = DecoderLayer(shape, qkv_in=128).to(dtype)
    apart = copy.deepcopy(layer)
    pack_linears(layer)
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    assert getattr(apart.self_attn, "qkv", None) is None
    x, h = torch.randn(3, 5, 128).to(dtype), torch.randn(3, 5, 64).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for got, want in zip(attn.project(x), apart.self_attn.project(x)):
            assert got.shape == want.shape
            assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
        assert torch.allclose(mlp(h).float(), apart.mlp(h).float(), atol=tol, rtol=tol)
        assert attn.q_proj._packed is None  # the fused product ran, not the parts
