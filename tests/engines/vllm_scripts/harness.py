"""Tiny float32 checkpoints for the vLLM engine tests (built in the main venv), sized so vLLM's
CPU attention accepts them.  The engines themselves run through
specplug.integrations.vllm.subprocess_job, one per subprocess in vLLM's venv.
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# CPU attention takes head sizes 32, 64, 80, ...: hidden 128 over 2 heads gives 64
TARGET_SHAPE = {"hidden": 128, "heads": 2, "kv_heads": 2, "layers": 2}
# An explicit KV size: tiny models need a few MiB, a crowded test machine may not have the 1 GiB
# VLLM_CPU_KVCACHE_SPACE asks for, and with eager mode vLLM then skips its warm-up pass.
LLM_KWARGS = {"max_model_len": 512, "kv_cache_memory_bytes": 64 << 20}


# -- tiny checkpoints (built in the main venv) ----------------------------------------------------
def build_target(folder: str, seed: int = 0):
    """Tiny Llama target saved in float32 (vLLM runs float32 on CPU); returns (model, tokenizer)."""
    import torch

    from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(seed, dtype=torch.float32, hidden=TARGET_SHAPE["hidden"],
                             heads=TARGET_SHAPE["heads"], kv_heads=TARGET_SHAPE["kv_heads"],
                             layers=TARGET_SHAPE["layers"])
    save_model(model, tok, folder)
    return model, tok


def build_draft(folder: str, target, tokenizer, noise: float = 0.3) -> str:
    from specplug.models.tiny import perturbed_copy, save_model
    return save_model(perturbed_copy(target, noise), tokenizer, folder)


def build_other_tokenizer_draft(folder: str, seed: int = 3) -> str:
    """A draft with another tokenizer (vocab 320 BPE) and another width: bridged through text."""
    import torch

    from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
    tok = build_tiny_tokenizer(vocab_size=320)
    model = build_tiny_llama(seed, dtype=torch.float32, vocab_size=320, hidden=64)
    return save_model(model, tok, folder)


def build_causal_dream(folder: str, target) -> str:
    """The target's own weights in Dream's layout (Qwen2 layers: zero q/k/v biases), causal, with
    the last id as mask token: a diffusion LM for specdiff that drafts like the target."""
    import json

    import torch
    from safetensors.torch import save_file
    c = target.config
    cfg = {"architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_parameters["rope_theta"], "mask_token_id": c.vocab_size - 1, "is_causal": True,
           "tie_word_embeddings": False, "max_position_embeddings": c.max_position_embeddings}
    state = {k: v.detach().clone().contiguous() for k, v in target.state_dict().items()}
    for i in range(c.num_hidden_layers):
        for name in ("q", "k", "v"):
            w = state[f"model.layers.{i}.self_attn.{name}_proj.weight"]
            state[f"model.layers.{i}.self_attn.{name}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder


def tiny_prompts(tokenizer, n: int = 6) -> list[list[int]]:
    """Snippets of the tokenizer's corpus (n-gram lookup finds matches) and arbitrary id lists."""
    texts = ["the cat sat on the mat. the dog", "def add(a, b): return a + b. def",
             "one two three four five six", "hello world, hello", "a bird flew over the tree"]
    prompts = [tokenizer.encode(t) for t in texts][:n]
    extra = [[5, 6, 7, 8, 9, 10, 11], [100, 7, 100, 7, 100], [40, 41, 42, 43]]
    prompts += extra[:max(0, n - len(prompts))]
    return prompts



def build_eagle_head(folder: str, target, noise: float = 0.05, seed: int = 5) -> str:
    """SafeAILab EAGLE-1/2 layout over the target: fc [H, 2H] reading the embedding, layer 0 =
    the target's first layer (no input_layernorm), plus noise; the target's embedding."""
    import json

    import torch
    from safetensors.torch import save_file
    c = target.config
    h = c.hidden_size
    g = torch.Generator().manual_seed(seed)
    state = {"fc.weight": torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1),
             "embed_tokens.weight": target.model.embed_tokens.weight.detach().clone()}
    for k, v in target.model.layers[0].state_dict().items():
        if not k.startswith("input_layernorm"):
            state["layers.0." + k] = v.detach().clone()
    for k, v in state.items():
        if k != "embed_tokens.weight":
            state[k] = (v + torch.randn(v.shape, generator=g) * noise * v.std()).float().contiguous()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
           "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
           "head_dim": h // c.num_attention_heads, "rms_norm_eps": c.rms_norm_eps,
           "max_position_embeddings": c.max_position_embeddings,
           "rope_theta": c.rope_parameters["rope_theta"], "vocab_size": c.vocab_size,
           "hidden_act": "silu", "torch_dtype": "float32", "tie_word_embeddings": False}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder
