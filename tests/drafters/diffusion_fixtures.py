"""Tiny checkpoints in DFlash (z-lab) and Dream (SpecDiff) layouts, written by the tests.

Constructions used to reach tau = gamma + 1 (see each builder):
  repeat_target   a tiny Llama whose layers add nothing (o_proj, down_proj = 0) and whose lm_head
                  is its embedding with equal-norm rows: greedy next token = current token.
  copy_dflash     a DFlash head that puts norm(embedding(last token)) on every mask position, so
                  it drafts the repeat target's continuation exactly.
  dream_from_llama the target's own weights in Dream layout, is_causal: with left_to_right order
                  and one token per step it is the target decoding autoregressively.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from specplug.drafters.dflash import DFlashHead
from specplug.drafters.diffusion_model import Shape
from specplug.models.tiny import build_tiny_llama


def write_checkpoint(folder: str, config: dict, state: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    return folder


# -- targets ---------------------------------------------------------------------------------------
def repeat_target(seed: int = 0, mask_token_id: int = 0):
    """Greedy continuation of any prompt = its last token forever; mask token embeds to zero."""
    model = build_tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.nn.functional.normalize(emb, dim=-1) * 4.0)
        emb[mask_token_id] = 0.0
        model.lm_head.weight.copy_(emb * 2.0)
    return model


# -- DFlash ----------------------------------------------------------------------------------------
def dflash_config(target_config, block_size=8, target_layer_ids=(0, 1), mask_token_id=0, layers=1,
                  heads=4, kv_heads=2, head_dim=16, nested=True) -> dict:
    cfg = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3",
           "hidden_size": target_config.hidden_size, "intermediate_size": 2 * target_config.hidden_size,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "attention_bias": False, "vocab_size": target_config.vocab_size,
           "num_target_layers": target_config.num_hidden_layers, "tie_word_embeddings": False}
    inner = {"block_size": block_size, "mask_token_id": mask_token_id,
             "target_layer_ids": list(target_layer_ids)}
    if nested:
        cfg["dflash_config"] = inner
    else:  # older z-lab checkpoints
        cfg.update(inner)
    return cfg


def _dflash_shape(cfg: dict) -> Shape:
    return Shape.from_config(cfg, "fixture", qkv_bias=False, qk_norm=True)


def random_dflash(folder: str, target, seed: int = 0, scale: float = 1.0, **kw) -> str:
    cfg = dflash_config(target.config, **kw)
    ids = cfg.get("dflash_config", cfg)["target_layer_ids"]
    torch.manual_seed(seed)
    head = DFlashHead(_dflash_shape(cfg), len(ids)).double()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return write_checkpoint(folder, cfg, head.state_dict())


def copy_dflash(folder: str, target, block_size: int = 8, mask_token_id: int = 0) -> str:
    """For repeat_target: zero context (fc = 0), zero queries so attention is uniform, values =
    identity; masks embed to 0, so each mask position gets c * norm(e_last) and the shared
    lm_head scores the last token highest (RMS norms are scale-free)."""
    hidden = target.config.hidden_size
    cfg = dflash_config(target.config, block_size=block_size, mask_token_id=mask_token_id,
                        heads=4, kv_heads=4, head_dim=hidden // 4)
    head = DFlashHead(_dflash_shape(cfg), 2).double()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.copy_(torch.eye(hidden))
            else:
                p.zero_()
        head.norm.weight.copy_(target.model.norm.weight)
    return write_checkpoint(folder, cfg, head.state_dict())


# -- Dream -----------------------------------------------------------------------------------------
def dream_config(vocab, hidden=64, layers=2, heads=4, kv_heads=2, mask_token_id=255,
                 is_causal=False, tie=False) -> dict:
    cfg = {"architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "mask_token_id": mask_token_id, "tie_word_embeddings": tie,
           "max_position_embeddings": 512}
    if is_causal:
        cfg["is_causal"] = True
    return cfg


def dream_state_from_llama(model) -> dict:
    """A Llama's weights under Dream's names, with the zero q/k/v biases Qwen2 layers carry."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):
        for name in ("q", "k", "v"):
            w = state[f"model.layers.{i}.self_attn.{name}_proj.weight"]
            state[f"model.layers.{i}.self_attn.{name}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return state


def dream_from_llama(folder: str, model, is_causal=True, mask_embedding=None) -> str:
    """The model's weights in Dream layout plus one extra vocabulary row for the mask token (as
    Dream adds its special mask token): zero embedding, zero lm_head row, id = vocab_size."""
    c = model.config
    cfg = dream_config(c.vocab_size + 1, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                       c.num_key_value_heads, c.vocab_size, is_causal)
    cfg["intermediate_size"] = c.intermediate_size
    state = dream_state_from_llama(model)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[key]
        state[key] = torch.cat([w, w.new_zeros(1, w.shape[1])])
    if mask_embedding is not None:
        state["model.embed_tokens.weight"][-1] = mask_embedding
    return write_checkpoint(folder, cfg, state)


def random_dream(folder: str, vocab: int, seed: int = 0, is_causal: bool = False) -> str:
    """Random weights, vocab + 1 rows (the last is the mask token)."""
    return dream_from_llama(folder, build_tiny_llama(seed, vocab_size=vocab), is_causal=is_causal)


def constant_dream(folder: str, vocab: int, token: int) -> str:
    """Always predicts `token`: layers add nothing, embedding dim 0 is positive for every token,
    and only lm_head row `token` reads dim 0."""
    model = build_tiny_llama(0, vocab_size=vocab)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 5.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 10.0
    mask_row = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    mask_row[0] = 5.0
    return dream_from_llama(folder, model, is_causal=False, mask_embedding=mask_row)


def write_lora_adapter(folder: str, base: str, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       r: int, alpha: float) -> str:
    """deltas: module name (e.g. model.layers.0.self_attn.q_proj) -> (A [r, in], B [out, r])."""
    os.makedirs(folder, exist_ok=True)
    state = {}
    for module, (a, b) in deltas.items():
        state[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(state, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "base_model_name_or_path": base, "r": r,
                   "lora_alpha": alpha, "target_modules": sorted({m.split(".")[-1] for m in deltas})}, f)
    return folder


# -- engine helpers ----------------------------------------------------------------------------------
def mixed_prompts(n: int = 20, seed: int = 0, max_new_tokens: int = 24, lo: int = 3, hi: int = 40,
                  last_token: int | None = None):
    from specplug.engine.rows import Request
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for length in torch.randint(lo, hi, (n,), generator=g).tolist():
        ids = torch.randint(1, 256, (length,), generator=g).tolist()
        if last_token is not None:
            ids[-1] = last_token
        reqs.append(Request(ids, max_new_tokens=max_new_tokens))
    return reqs


def generate(model, tokenizer, drafter, requests, batch_size=1, gamma=5, sampling=None):
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.types import SamplingParams
    engine = EmbeddedEngine(model, tokenizer, drafter, num_draft_tokens=gamma,
                            sampling=sampling or SamplingParams())
    return engine.generate(requests, batch_size=batch_size)


def markov_marginals(model, last_token: int, steps: int, sampling) -> list[torch.Tensor]:
    """For repeat_target (next token depends on the current token only): the exact distribution
    of output tokens 1..steps after a prompt ending in last_token."""
    from specplug.sampling import probs_from_logits
    vocab = model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=torch.arange(vocab)[:, None]).logits[:, 0]
    trans = probs_from_logits(logits, sampling)  # [vocab, vocab] row x -> next token
    dist = trans[last_token]
    out = [dist]
    for _ in range(steps - 1):
        dist = dist @ trans
        out.append(dist)
    return out


def chi_square_p(samples: list[int], probs: torch.Tensor) -> float:
    """Goodness of fit of sampled token ids to probs [vocab] (tests/sampling_checks.py)."""
    from sampling_checks import goodness_of_fit_p
    return goodness_of_fit_p(samples, probs.double().cpu().numpy())


def rewrite_checkpoint(src: str, dst: str, edit_state=None, edit_config=None) -> str:
    """Copy a checkpoint folder with its state dict and/or config edited (malformed inputs)."""
    from specplug.checkpoint_io import load_state_dict, read_config
    cfg, state = read_config(src), load_state_dict(src)
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(cfg)
    return write_checkpoint(dst, cfg, state)


def assert_lossless_on_markov_target(model, drafter, draws: int = 600) -> None:
    """At T = 8 on repeat_target(), output tokens 1..3 follow the target's exact marginals
    (chi-square p > 0.01), with both the accept and the reject path exercised."""
    from specplug.engine.rows import Request
    from specplug.types import SamplingParams
    sampling = SamplingParams(temperature=8.0)
    last = 69
    reqs = [Request([5, 9, last], max_new_tokens=4, seed=s) for s in range(draws)]
    # no tokenizer: no EOS id, so every row samples all 4 tokens
    out, stats = generate(model, None, drafter, reqs, batch_size=50, gamma=3, sampling=sampling)
    assert 0.2 < stats.acceptance_rate < 0.99
    exact = markov_marginals(model, last, 4, sampling)
    for i in range(1, 4):
        p = chi_square_p([o.output_token_ids[i] for o in out], exact[i])
        assert p > 0.01, f"output token {i}: chi-square p = {p}"
