"""DecoderStack: an HF Llama/Qwen2/Qwen3 run through specplug's DecoderLayer gives HF's logits
and hidden states exactly, over a prefill, a chain step and a tree step on one SlotCache; models
it does not cover keep HF's forward."""
import logging

import pytest
import torch

from specplug.engine.kv import SlotCache
from specplug.models.attention import use_grouped_attention
from specplug.models.decoder_stack import DecoderStack, decoder_stack_for
from specplug.models.tiny import build_tiny_llama, tiny_llama_config


def _qwen(kind: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    shape = tiny_llama_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    kw = {k: shape[k] for k in keep}
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(**kw)).double().eval()
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw)).double().eval()  # q/k norms


MODELS = {"llama": lambda: build_tiny_llama(0), "qwen2": lambda: _qwen("qwen2"),
          "qwen3": lambda: _qwen("qwen3")}


def _three_blocks(net, batch: int = 2):
    """Logits and hidden states of a prefill, a 3-token chain and a 3-node tree (node 2 sees
    only node 0), each appended to the cache and kept."""
    gen = torch.Generator().manual_seed(3)
    cache, outs = SlotCache(batch, "cpu"), []
    ids = torch.randint(1, 250, (batch, 7), generator=gen)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, 5:] = False  # a shorter second prompt
    pos = torch.arange(7).expand(batch, 7)
    outs.append(cache.forward(net, ids, pos, real, output_hidden_states=True))
    cache.commit([list(range(7)), list(range(5))])
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(batch, 3, 3)
    for block_mask, depth in ((None, [0, 1, 2]), (tree, [0, 1, 1])):
        ids = torch.randint(1, 250, (batch, 3), generator=gen)
        pos = cache.length[:, None] + torch.tensor(depth)
        outs.append(cache.forward(net, ids, pos, torch.ones_like(ids, dtype=torch.bool),
                                  block_mask, output_hidden_states=True))
        cache.commit([[0, 1], [0]])
    return outs


@pytest.mark.parametrize("kind", MODELS)
def test_the_stack_computes_what_transformers_does(kind):
    model = MODELS[kind]()
    use_grouped_attention(model)
    stack = decoder_stack_for(model)
    assert isinstance(stack, DecoderStack)
    with torch.inference_mode():
        want, got = _three_blocks(model), _three_blocks(stack)
    for w, g in zip(want, got):
        assert torch.equal(w.logits, g.logits)
        assert len(w.hidden_states) == len(g.hidden_states)
        for hw, hg in zip(w.hidden_states, g.hidden_states):
            assert torch.equal(hw, hg)


def test_the_stack_shares_the_models_weights():
    model = build_tiny_llama(0)
    stack = decoder_stack_for(model)
    ours = {p.data_ptr() for p in stack.parameters()}
    assert ours <= {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():  # a weight edited in the model is edited in the stack
        model.model.layers[1].mlp.down_proj.weight.zero_()
    assert not stack.layers[1].mlp.down_proj.weight.any()


def test_uncovered_models_keep_transformers_forward(caplog):
    eager = build_tiny_llama(0)
    eager.set_attn_implementation("eager")
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with caplog.at_level(logging.INFO, logger="specplug"):
        assert decoder_stack_for(eager) is None
        assert decoder_stack_for(gpt2) is None
    assert "attention 'eager'" in caplog.text and "model type 'gpt2'" in caplog.text


@pytest.mark.parametrize("net", ["hf", "stack"])
def test_logits_to_keep_gives_the_last_columns(net):
    model = build_tiny_llama(0)
    run = model if net == "hf" else decoder_stack_for(model)
    ids = torch.randint(1, 250, (2, 6), generator=torch.Generator().manual_seed(0))
    pos, real = torch.arange(6).expand(2, 6), torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        full = SlotCache(2, "cpu").forward(run, ids, pos, real).logits
        last = SlotCache(2, "cpu").forward(run, ids, pos, real, logits_to_keep=1).logits
    # (float64 BLAS rounds a row by the batch it comes in: equal to 1e-12, not bitwise)
    assert last.shape == (2, 1, full.shape[-1])
    assert torch.allclose(last[:, 0], full[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_projections_give_transformers_logits(dtype):
    from specplug.models.packed_linear import pack_linears, packing_works
    if not packing_works(dtype):
        pytest.skip(f"no oneDNN packed linear for {dtype} here")
    model = build_tiny_llama(0, dtype=dtype)
    use_grouped_attention(model)
    pack_linears(model)
    stack = decoder_stack_for(model)
    attn, mlp = stack.layers[0].self_attn, stack.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    with torch.inference_mode():
        got = _three_blocks(stack)
        # the fused products ran: the parts were never packed one by one (no second copy)
        assert attn.q_proj._packed is None and mlp.up_proj._packed is None
        assert attn.o_proj._packed is not None
        want = _three_blocks(model)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for w, g in zip(want, got):
        assert torch.allclose(w.logits.float(), g.logits.float(), atol=tol, rtol=tol)
