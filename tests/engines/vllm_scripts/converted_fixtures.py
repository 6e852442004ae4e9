"""Tiny native EAGLE-1, EAGLE-3 and DFlash checkpoints (built as tests/drafters' fixtures build
them) over float32 targets that vLLM's CPU attention accepts, for the converted-checkpoint tests.

Two targets, each one folder shared by its drafters:
  attention  eagle_fixtures.attention_only_target (hidden 64, one head of 64) plus two layers
             that add nothing: an EAGLE-1 / EAGLE-3 head built from its first layer drafts its
             argmax; noise makes it imperfect.  Three layers give EAGLE-3 three distinct aux
             ids below L (vLLM de-duplicates aux ids and its id L is the pre-norm output, HF's
             hidden_states[L] the post-norm one).
  markov     a repeat-style target (layers add nothing, greedy next token depends on the current
             token only) whose lm_head rows are permuted, so next = perm(current): fixed points
             repeat, the rest walk a cycle.  diffusion_fixtures.copy_dflash drafts perm(last) at
             every block position: the first draft is always right, later ones only on fixed
             points, so acceptance is partial and varies by request.
Everything is float32 (what vLLM runs on CPU), so the embedded engine sees the same weights.
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DRAFTER_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "drafters")
EAGLE3_AUX = [0, 1, 2]
ATTENTION_LAYERS = 3
MARKOV_MASK = 0  # mask token id of the DFlash head: zero embedding in the markov target
MARKOV_BLOCK = 8


def _fixtures():
    if DRAFTER_FIXTURES not in sys.path:
        sys.path.insert(0, DRAFTER_FIXTURES)
    import diffusion_fixtures
    import eagle_fixtures
    return eagle_fixtures, diffusion_fixtures


def _f32(state: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def save_target(model, folder: str) -> str:
    from specplug.models.tiny import build_tiny_tokenizer, save_model
    return save_model(model.float(), build_tiny_tokenizer(), folder)


def attention_target(folder: str):
    """-> (float32 model, folder)."""
    from transformers import LlamaForCausalLM
    ef, _ = _fixtures()
    one = ef.attention_only_target(0)
    cfg = one.config.to_dict()
    cfg["num_hidden_layers"] = ATTENTION_LAYERS
    model = LlamaForCausalLM(type(one.config).from_dict(cfg)).to(torch.float64)
    missing, _ = model.load_state_dict(one.state_dict(), strict=False)
    assert all(k.startswith("model.layers.") for k in missing), missing
    with torch.no_grad():
        for layer in model.model.layers[1:]:  # residual passes through unchanged
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.generation_config.eos_token_id = None
    model = model.float().eval()
    return model, save_target(model, folder)


def markov_target(folder: str, seed: int = 0, cycle_every: int = 3):
    """Hidden 128 over 2 heads (head size 64); next token = perm(current token), where perm
    swaps ids (3k+1, 3k+2) for every k and fixes the rest.  -> (float32 model, folder)."""
    from specplug.models.tiny import build_tiny_llama
    model = build_tiny_llama(seed, dtype=torch.float32, hidden=128, heads=2, kv_heads=2, layers=2)
    vocab = model.config.vocab_size
    with torch.no_grad():
        for layer in model.model.layers:  # every layer adds nothing: hidden = embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.nn.functional.normalize(emb, dim=-1) * 4.0)
        emb[MARKOV_MASK] = 0.0
        model.model.norm.weight.fill_(1.0)
        perm = torch.arange(vocab)
        for a in range(1, vocab - 1, cycle_every):
            perm[a], perm[a + 1] = a + 1, a
        # row perm(x) of lm_head is emb[x]: a hidden of norm(emb[x]) scores perm(x) highest
        inverse = torch.argsort(perm)
        model.lm_head.weight.copy_(emb[inverse] * 2.0)
    return model, save_target(model, folder)


def eagle1_head(folder: str, target, noise: float = 0.005) -> str:
    ef, _ = _fixtures()
    state, cfg = ef.eagle1_state(target.double(), noise=noise)
    target.float()
    cfg["torch_dtype"] = "float32"
    return ef.save_head(folder, _f32(state), cfg)


def eagle3_head(folder: str, target, noise: float = 0.05, draft_vocab: int = 200) -> str:
    ef, _ = _fixtures()
    state, cfg = ef.eagle3_state(target.double(), EAGLE3_AUX, noise=noise, draft_vocab=draft_vocab)
    target.float()
    cfg["torch_dtype"] = "float32"
    return ef.save_head(folder, _f32(state), cfg)


def dflash_head(folder: str, target) -> str:
    """copy_dflash (z-lab layout) over the markov target, rewritten in float32."""
    _, df = _fixtures()
    import json

    from safetensors.torch import load_file, save_file
    path = df.copy_dflash(folder, target.double(), block_size=MARKOV_BLOCK, mask_token_id=MARKOV_MASK)
    target.float()
    weights = os.path.join(path, "model.safetensors")
    save_file(_f32(load_file(weights)), weights)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "float32"
    cfg["max_position_embeddings"] = 512
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def prompts_for(kind: str, n: int = 6) -> list[list[int]]:
    """attention: BOS-led random ids (the EAGLE construction needs BOS first); markov: short
    random ids ending in a mix of fixed points and swapped ids."""
    ef, _ = _fixtures()
    if kind == "attention":
        return ef.bos_prompts(n, seed=1)
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        ids = torch.randint(1, 256, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        ids[-1] = 3 * (i + 5) + i % 3  # every residue mod 3: both fixed points and swaps
        out.append(ids)
    return out
