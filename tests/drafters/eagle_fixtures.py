"""Tiny EAGLE-1/2 and EAGLE-3 checkpoints in their native layouts, built from tiny targets.

The "attention-only" target makes a head that reproduces it exactly constructible:
  * 1 layer, 1 attention head, MLP down_proj = 0;
  * embeddings live in dims [0, H/2) with RMS 1 (so input_layernorm is the identity, which an
    EAGLE-1 layer 0 lacks); o_proj and lm_head only use dims [H/2, H), so the logits are a
    positive multiple of lm_head(attention output) and ignore the residual embedding;
  * token BOS has a zero embedding (zero key and value): a head never sees x_0, and with BOS
    there the target's attention output differs from the head's by a positive scale only.
Every prompt starts with BOS.  A head with fc selecting the embedding (EAGLE-1) or q/k/v reading
only the embedding half (EAGLE-3), and the target's layer, then drafts exactly the target's
argmax.  Adding noise to that head gives an imperfect drafter.
"""
from __future__ import annotations

import json
import os

import torch

from specplug.models.tiny import build_tiny_llama

BOS = 1
VOCAB = 256
HIDDEN = 64


def attention_only_target(seed: int = 0, lm_scale: float = 300.0):
    model = build_tiny_llama(seed, layers=1, heads=1, kv_heads=1, rms_norm_eps=1e-12)
    half = HIDDEN // 2
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[0] = torch.randn(HIDDEN, dtype=emb.dtype)  # the padding row starts at zero
        emb[:, half:] = 0
        emb.mul_((HIDDEN ** 0.5) / emb.norm(dim=1, keepdim=True))
        emb[BOS] = 0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight[:half] = 0
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight[:, :half] = 0
        model.lm_head.weight.mul_(lm_scale)  # the attention output is small: sharpen
    return model


def bos_prompts(n: int, seed: int = 0, lo: int = 4, hi: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[BOS] + torch.randint(2, VOCAB, (m - 1,), generator=g).tolist() for m in lens]


def _noisy(state: dict, noise: float, seed: int) -> dict:
    if noise <= 0:
        return state
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            scale = v.std().clamp(min=1e-2) if v.numel() > 1 else torch.tensor(1e-2)
            v = v + torch.randn(v.shape, generator=g, dtype=v.dtype) * noise * scale
        out[k] = v
    return out


def _head_config(target, arch: str, hidden: int | None = None, **extra) -> dict:
    c = target.config
    hidden = hidden or c.hidden_size
    heads = c.num_attention_heads if hidden == c.hidden_size else 2
    return {"architectures": [arch], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": hidden * 2, "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": c.num_key_value_heads if hidden == c.hidden_size else 1,
            "head_dim": hidden // heads, "rms_norm_eps": c.rms_norm_eps,
            "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"],
            "vocab_size": c.vocab_size, "hidden_act": "silu", "torch_dtype": "float64", **extra}


def _layer_from_target(target, prefix: str, skip_input_norm: bool) -> dict:
    src = {k: v.clone() for k, v in target.model.layers[0].state_dict().items()}
    return {prefix + k: v for k, v in src.items()
            if not (skip_input_norm and k.startswith("input_layernorm"))}


def eagle1_state(target, noise: float = 0.0, seed: int = 1, fc_bias: bool = False,
                 qkv_bias: bool = False, with_embed: bool = True) -> tuple[dict, dict]:
    """SafeAILab EAGLE-1/2 head: fc [H, 2H] selecting the embedding, layer 0 = target's layer."""
    h = target.config.hidden_size
    state = {"fc.weight": torch.cat([torch.eye(h), torch.zeros(h, h)], 1).double()}
    if fc_bias:
        state["fc.bias"] = torch.zeros(h, dtype=torch.float64)
    state.update(_layer_from_target(target, "layers.0.", skip_input_norm=True))
    if qkv_bias:
        for p in ("q", "k", "v"):
            w = state[f"layers.0.self_attn.{p}_proj.weight"]
            state[f"layers.0.self_attn.{p}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    state = _noisy(state, noise, seed)
    if with_embed:
        state["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().clone()
    arch = "Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"
    return state, _head_config(target, arch)


def eagle1_het_state(target, hidden: int = 32, seed: int = 2, draft_vocab: int | None = None):
    """Heterogeneous head (seed 003): own width, l2s back to the target's; random weights."""
    g = torch.Generator().manual_seed(seed)
    h_t = target.config.hidden_size
    cfg = _head_config(target, "LlamaForCausalLM", hidden=hidden, target_hidden_size=h_t)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.1  # noqa: E731
    head_dim = cfg["head_dim"]
    state = {"fc.weight": rnd(hidden, 2 * h_t), "l2s.weight": rnd(h_t, hidden) * 5,
             "layers.0.self_attn.q_proj.weight": rnd(cfg["num_attention_heads"] * head_dim, hidden),
             "layers.0.self_attn.k_proj.weight": rnd(head_dim, hidden),
             "layers.0.self_attn.v_proj.weight": rnd(head_dim, hidden),
             "layers.0.self_attn.o_proj.weight": rnd(hidden, cfg["num_attention_heads"] * head_dim),
             "layers.0.mlp.gate_proj.weight": rnd(2 * hidden, hidden),
             "layers.0.mlp.up_proj.weight": rnd(2 * hidden, hidden),
             "layers.0.mlp.down_proj.weight": rnd(hidden, 2 * hidden),
             "layers.0.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float64)}
    if draft_vocab:
        ids = _draft_ids(target.config.vocab_size, draft_vocab, seed)
        state["lm_head.weight"] = target.lm_head.weight.detach()[ids].clone()
        state["d2t"] = ids - torch.arange(draft_vocab)
        state["t2d"] = torch.zeros(target.config.vocab_size, dtype=torch.bool).index_fill(0, ids, True)
        cfg["draft_vocab_size"] = draft_vocab
    return state, cfg


def _draft_ids(vocab: int, draft_vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=g)[:draft_vocab].sort().values


def eagle3_state(target, aux_ids: list[int] | None, noise: float = 0.0, seed: int = 3,
                 draft_vocab: int | None = None, id_key: str = "eagle_aux_hidden_state_layer_ids"):
    """EAGLE-3 head whose midlayer attention reads only input_layernorm(embedding) through the
    target's q/k/v and whose fc is zero: on the attention-only target it drafts the argmax."""
    c = target.config
    h, vocab = c.hidden_size, c.vocab_size
    n_aux = len(aux_ids) if aux_ids else 3
    layer = _layer_from_target(target, "midlayer.", skip_input_norm=False)
    for p in ("q", "k", "v"):
        w = layer[f"midlayer.self_attn.{p}_proj.weight"]
        layer[f"midlayer.self_attn.{p}_proj.weight"] = torch.cat([w, torch.zeros_like(w)], 1)
    # norm_before_residual with a zero hidden_norm: the residual (fc(g) while catching up, the
    # previous output while drafting) never reaches the output, as in the 1-layer target
    layer["midlayer.hidden_norm.weight"] = torch.zeros(h, dtype=torch.float64)
    state = {"fc.weight": torch.zeros(h, n_aux * h, dtype=torch.float64),
             "norm.weight": torch.ones(h, dtype=torch.float64), **layer}
    ids = _draft_ids(vocab, draft_vocab, seed) if draft_vocab else torch.arange(vocab)
    state["lm_head.weight"] = target.lm_head.weight.detach()[ids].clone()
    state = _noisy(state, noise, seed)
    state["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().clone()
    state["d2t"] = ids - torch.arange(len(ids))
    state["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, ids, True)
    extra = {"draft_vocab_size": len(ids), "norm_before_residual": True}
    if aux_ids is not None:
        if id_key == "eagle_config":
            extra["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_ids,
                                     "use_aux_hidden_state": True}
        else:
            extra[id_key] = aux_ids
    return state, _head_config(target, "LlamaForCausalLMEagle3", **extra)


def save_head(folder: str, state: dict, cfg: dict, layout: str = "safetensors") -> str:
    """layout: safetensors | bin | sharded | specforge_train (draft_model. prefix, d2t/t2d in
    vocab_mapping.pt beside the weights)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    state = {k: v.contiguous() for k, v in state.items()}
    if layout == "specforge_train":
        mapping = {k: state.pop(k) for k in ("d2t", "t2d") if k in state}
        torch.save(mapping, os.path.join(folder, "vocab_mapping.pt"))
        state = {"draft_model." + k: v for k, v in state.items()}
        layout = "safetensors"
    if layout == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    elif layout == "sharded":
        from safetensors.torch import save_file
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[::2],
                  "model-00002-of-00002.safetensors": keys[1::2]}
        weight_map = {}
        for name, ks in halves.items():
            save_file({k: state[k] for k in ks}, os.path.join(folder, name))
            weight_map.update({k: name for k in ks})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
    else:
        from safetensors.torch import save_file
        save_file(state, os.path.join(folder, "model.safetensors"))
    return folder


# -- running and checking -------------------------------------------------------------------
def run(model, drafter, prompts, batch_size, gamma=4, max_new=20, sampling=None, seeds=None):
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.engine.rows import Request
    from specplug.types import SamplingParams
    reqs = [Request(p, max_new_tokens=max_new, seed=None if seeds is None else seeds[i])
            for i, p in enumerate(prompts)]
    engine = EmbeddedEngine(model, None, drafter, num_draft_tokens=gamma if drafter else 0,
                            sampling=sampling or SamplingParams())
    outs, stats = engine.generate(reqs, batch_size=batch_size)
    return [o.output_token_ids for o in outs], stats


def second_token_marginal(model, prompt: list[int]) -> torch.Tensor:
    """Exact P(second output token) at T=1: sum over x1 of p(x1 | prompt) p(x2 | prompt, x1)."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        ids = torch.cat([torch.tensor(prompt).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        p2 = torch.softmax(model(ids).logits[:, -1].double(), -1)  # [x1, x2]
    return p1 @ p2


def chi_square_p(samples: list[int], probs: torch.Tensor) -> float:
    """Goodness of fit of sampled token ids to probs [vocab] (tests/sampling_checks.py)."""
    from sampling_checks import goodness_of_fit_p
    return goodness_of_fit_p(samples, probs.double().cpu().numpy())
