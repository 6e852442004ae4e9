"""Tiny checkpoints in each source layout, built from seeded random tensors (no download)."""
from __future__ import annotations

import json
import os

import torch

H, HEADS, KV, HD, INTER, V = 32, 2, 1, 16, 48, 64


def _layer(prefix: str, attn_in: int, g: torch.Generator, qkv_bias=False, qk_norm=False, input_ln=True):
    r = lambda *s: torch.randn(*s, generator=g)
    t = {f"{prefix}self_attn.q_proj.weight": r(HEADS * HD, attn_in), f"{prefix}self_attn.k_proj.weight": r(KV * HD, attn_in),
         f"{prefix}self_attn.v_proj.weight": r(KV * HD, attn_in), f"{prefix}self_attn.o_proj.weight": r(H, HEADS * HD),
         f"{prefix}mlp.gate_proj.weight": r(INTER, H), f"{prefix}mlp.up_proj.weight": r(INTER, H),
         f"{prefix}mlp.down_proj.weight": r(H, INTER), f"{prefix}post_attention_layernorm.weight": 1 + 0.1 * r(H)}
    if input_ln:
        t[f"{prefix}input_layernorm.weight"] = 1 + 0.1 * r(H)
    if qkv_bias:
        t.update({f"{prefix}self_attn.q_proj.bias": r(HEADS * HD), f"{prefix}self_attn.k_proj.bias": r(KV * HD),
                  f"{prefix}self_attn.v_proj.bias": r(KV * HD)})
    if qk_norm:
        t.update({f"{prefix}self_attn.q_norm.weight": 1 + 0.1 * r(HD), f"{prefix}self_attn.k_norm.weight": 1 + 0.1 * r(HD)})
    return t


def llama_cfg(arch: str, layers: int = 1, model_type: str = "llama", **extra) -> dict:
    return {"architectures": [arch], "model_type": model_type, "hidden_size": H, "intermediate_size": INTER,
            "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
            "vocab_size": V, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "hidden_act": "silu", "torch_dtype": "float32", **extra}


def save(folder: str, cfg: dict | None, state: dict, fmt: str = "safetensors", shards: int = 1) -> str:
    os.makedirs(folder, exist_ok=True)
    if cfg is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
    keys = sorted(state)
    if fmt == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return folder
    from safetensors.torch import save_file
    if shards == 1:
        save_file(state, os.path.join(folder, "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def _target_embed(ver):
    from specplug.checkpoint_io import load_state_dict
    return load_state_dict(ver)["model.embed_tokens.weight"].clone()


def eagle1(folder, seed=0, fc_bias=True, qwen2=False, embed=True, layers=1, fmt="safetensors", shards=1,
           embed_from=None):
    g = torch.Generator().manual_seed(seed)
    st = {"fc.weight": torch.randn(H, 2 * H, generator=g)}
    if fc_bias:
        st["fc.bias"] = torch.randn(H, generator=g)
    for i in range(layers):
        st.update(_layer(f"layers.{i}.", H, g, qkv_bias=qwen2, input_ln=i > 0))
    if embed:  # SafeAILab heads carry a copy of the target's embedding
        st["embed_tokens.weight"] = _target_embed(embed_from) if embed_from else torch.randn(V, H, generator=g)
    arch, mt = ("Qwen2ForCausalLM", "qwen2") if qwen2 else ("LlamaForCausalLM", "llama")
    return save(folder, llama_cfg(arch, layers, mt), st, fmt, shards)


def eagle3_state(seed=0, draft_vocab=48, target_hidden=H, n_aux=3, prefix="", midlayer=True, embed=False):
    g = torch.Generator().manual_seed(seed)
    lay = "midlayer." if midlayer else "layers.0."
    st = {"fc.weight": torch.randn(H, n_aux * target_hidden, generator=g), "norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
          "lm_head.weight": torch.randn(draft_vocab, H, generator=g)}
    st.update(_layer(lay, 2 * H, g))
    st[lay + "hidden_norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    # reduced vocabulary: every other id first, then the rest in order (a real-looking map)
    ids = torch.cat([torch.arange(0, V, 2), torch.arange(1, V, 2)])[:draft_vocab].sort().values
    st["d2t"] = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    st["t2d"] = t2d
    if embed:
        st["embed_tokens.weight"] = torch.randn(V, H, generator=g)
    return {prefix + k: v for k, v in st.items()}


def eagle3_cfg(draft_vocab=48, target_hidden=None, aux=None, **extra):
    cfg = llama_cfg("LlamaForCausalLMEagle3", draft_vocab_size=draft_vocab, **extra)
    if target_hidden:
        cfg["target_hidden_size"] = target_hidden
    if aux:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux}
    return cfg


def eagle3(folder, seed=0, draft_vocab=48, fmt="safetensors", **kw):
    return save(folder, eagle3_cfg(draft_vocab, aux=[1, 2, 3]), eagle3_state(seed, draft_vocab, **kw), fmt)


def specforge(out_dir, seed=0, draft_vocab=48, embed_from=None):
    """SpecForge training output: epoch folders with draft_model.-prefixed weights, d2t/t2d in a
    vocab_mapping.pt saved beside (not in the weights), optimizer state that must be ignored."""
    st = eagle3_state(seed, draft_vocab, prefix="draft_model.", embed=True)
    mapping = {"d2t": st.pop("draft_model.d2t"), "t2d": st.pop("draft_model.t2d")}
    if embed_from:
        st["draft_model.embed_tokens.weight"] = _target_embed(embed_from)
    for epoch in (0, 1):
        folder = save(os.path.join(out_dir, f"epoch_{epoch}"), eagle3_cfg(draft_vocab), st if epoch else {k: v * 0 for k, v in st.items()})
        torch.save({"step": epoch}, os.path.join(folder, "training_state.pt"))
    torch.save(mapping, os.path.join(out_dir, "vocab_mapping.pt"))
    return out_dir


def specforge_het(folder, seed=0, drafter="LlamaDrafter"):
    g = torch.Generator().manual_seed(seed)
    st = {"eagle_fc.weight": torch.randn(H, 2 * H, generator=g), "eagle_fc.bias": torch.randn(H, generator=g)}
    st.update(_layer("layers.0.", H, g, qk_norm=drafter == "Qwen3Drafter", input_ln=False))
    st["rotary_emb.inv_freq"] = torch.ones(HD // 2)  # saved by older transformers: must be dropped
    base = llama_cfg("Qwen3MoeForCausalLM", layers=4, model_type="qwen3_moe",
                     speculative_decoding_algorithm="EagleV2", speculative_decoding_draft_model=drafter,
                     speculative_decoding_base_model_path="/models/base", draft_layers=1,
                     skip_first_input_layernorm=True, skip_output_norm=True)
    os.makedirs(os.path.join(folder, "draft_model"), exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(base, f)
    with open(os.path.join(folder, "draft_model", "config.json"), "w") as f:
        json.dump(llama_cfg("LlamaForCausalLM" if drafter == "LlamaDrafter" else "Qwen3ForCausalLM"), f)
    torch.save(st, os.path.join(folder, "draft_model", "states.pt"))
    return folder


def dflash(folder, seed=0, layer_ids=(0, 2), layers=2, block_top_level=False, fmt="safetensors"):
    g = torch.Generator().manual_seed(seed)
    st = {"fc.weight": torch.randn(H, len(layer_ids) * H, generator=g),
          "hidden_norm.weight": 1 + 0.1 * torch.randn(H, generator=g), "norm.weight": 1 + 0.1 * torch.randn(H, generator=g)}
    for i in range(layers):
        st.update(_layer(f"layers.{i}.", H, g, qk_norm=True))
    dcfg = {"mask_token_id": V - 1, "target_layer_ids": list(layer_ids)}
    cfg = llama_cfg("DFlashDraftModel", layers, "qwen3", num_target_layers=4, dflash_config=dcfg,
                    layer_types=["full_attention"] * layers)
    if block_top_level:
        cfg["block_size"] = 4
    else:
        dcfg["block_size"] = 4
    return save(folder, cfg, st, fmt)


def verifier(folder, hidden=H, vocab=V, layers=4):
    """A tiny Llama target with tokenizer-free config + weights."""
    from specplug.models.tiny import build_tiny_llama
    model = build_tiny_llama(0, dtype=torch.float32, vocab_size=vocab, hidden=hidden, layers=layers,
                             heads=HEADS, kv_heads=KV)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def record_proposals(model, method: str, path: str):
    """Run `method` from `path` in the embedded engine on three fixed prompts -> (every
    proposal's draft tokens, each request's (output ids, accept lengths))."""
    import torch

    from specplug.drafters.base import DrafterSpec, build_drafter
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.engine.rows import Request
    from specplug.models.loading import target_info
    drafter = build_drafter(DrafterSpec(method, path), target_info(model))
    proposals, propose = [], drafter.propose
    drafter.propose = lambda inp: proposals.append(propose(inp)) or proposals[-1]
    g = torch.Generator().manual_seed(0)
    reqs = [Request(torch.randint(1, V, (n,), generator=g).tolist(), max_new_tokens=12) for n in (5, 9, 3)]
    outs, _ = EmbeddedEngine(model, None, drafter, num_draft_tokens=3).generate(reqs, batch_size=2)
    assert proposals and all(p.tokens.numel() for p in proposals)
    return [p.tokens.tolist() for p in proposals], [(o.output_token_ids, o.accept_lengths) for o in outs]
