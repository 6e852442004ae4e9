"""A small transformer for diffusion drafters, and the SpecDiff checkpoint loader.

Layers are specplug's one decoder layer (decoder_layer.py: the Llama/Qwen2/Qwen3 key layout,
attending through an explicit boolean mask over [cached keys, new keys]), so one attention
serves three patterns: causal, bidirectional (masked diffusion), and DFlash's block attending to
context features.

SpecDiff checkpoint format: Dream's layout (Qwen2-based masked diffusion LM).
  config.json   architectures ["DreamModel"], hidden_size, intermediate_size, num_hidden_layers,
                num_attention_heads, num_key_value_heads, [head_dim], rms_norm_eps, rope_theta or
                rope_parameters {rope_theta, rope_type "default"}, vocab_size, mask_token_id,
                tie_word_embeddings, [attention_bias (default true, as Qwen2)],
                [is_causal (default false; true makes an AR model usable as a test drafter)],
                [shift_logits (default true: Dream scores token i + 1 at position i)].
  weights       model.embed_tokens.weight [V, H], model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias},
                model.layers.{i}.self_attn.o_proj.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
                model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight,
                lm_head.weight [V, H] (absent when tied).
  PEFT LoRA     a folder with adapter_config.json {base_model_name_or_path, r, lora_alpha,
                target_modules, [use_rslora]} and adapter_model.safetensors holding
                base_model.model.<module>.lora_A.weight [r, in] / lora_B.weight [out, r]; merged
                into the base as W + scale * B @ A, scale = lora_alpha / r (or / sqrt(r) with rslora).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint_io import CheckpointError, check_keys, load_file, read_config, weight_files
from .decoder_layer import DecoderLayer, LayerShape, RMSNorm, Rope, layer_keys


@dataclass
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def layer(self) -> LayerShape:
        return LayerShape(hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
                          head_dim=self.head_dim, intermediate=self.intermediate, eps=self.eps,
                          attn_bias=self.qkv_bias, qk_norm=self.qk_norm)

    @property
    def rope(self) -> Rope:
        return Rope(self.head_dim, self.rope_theta)

    @staticmethod
    def from_config(cfg: dict, where: str, qkv_bias: bool, qk_norm: bool) -> "Shape":
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in need if k not in cfg]
        if missing:
            raise CheckpointError(f"{where}: config has no {missing[0]}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{where}: rope type {kind!r} is not supported (only 'default')")
        heads = cfg["num_attention_heads"]
        return Shape(hidden=cfg["hidden_size"], heads=heads,
                     kv_heads=cfg.get("num_key_value_heads") or heads,
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                     intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                     eps=cfg.get("rms_norm_eps", 1e-6),
                     rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
                     qkv_bias=bool(cfg.get("attention_bias", qkv_bias)), qk_norm=qk_norm)


class DiffusionLM(nn.Module):
    """Masked-diffusion LM: embeddings, layers, norm, lm_head; attention pattern from the caller."""
    def __init__(self, s: Shape, vocab: int, mask_token_id: int, is_causal: bool = False,
                 shift_logits: bool = True):
        super().__init__()
        self.shape, self.vocab = s, vocab
        self.mask_token_id, self.is_causal, self.shift_logits = mask_token_id, is_causal, shift_logits
        self.embed_tokens = nn.Embedding(vocab, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(s.layer) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.eps)
        self.lm_head = nn.Linear(s.hidden, vocab, bias=False)
        self.rope = s.rope

    def forward(self, ids, pos, allowed, past=None, score=None):
        """ids, pos [b, q]; allowed [b, q, past_len + q]; past: per layer (k, v) or None;
        score [b, m] (optional): the entries to score (the lm_head over every context entry
        would cost more than the layers).  Returns logits [b, q, vocab] (unshifted: row i is
        the output at position i), or [b, m, vocab] for `score`, and the per-layer (k, v)."""
        x = self.embed_tokens(ids)
        rope = self.rope(x, pos)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, allowed, keep_and_join(new_kv, None if past is None else past[i]))
        if score is not None:
            x = x[torch.arange(x.shape[0], device=x.device)[:, None], score]
        return self.lm_head(self.norm(x)), new_kv


def keep_and_join(kept: list, past: tuple | None):
    """An `extend` for DecoderLayer: records the block's own (k, v) in `kept` and attends over
    past (k, v) [b, kv_heads, P, head_dim] (or None) followed by the block."""
    def extend(k, v):  # k, v [b, kv_heads, q, head_dim]
        kept.append((k, v))
        if past is None:
            return k, v
        return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    return extend


# -- loading -------------------------------------------------------------------------------------
def expected_layer_keys(s: Shape, prefix: str) -> dict[str, tuple]:
    """Key -> shape for every layer under prefix (e.g. 'model.layers.')."""
    out = {}
    for i in range(s.layers):
        out.update(layer_keys(f"{prefix}{i}.", s.layer))
    return out


def load_weights(folder: str) -> tuple[dict, str]:
    """State dict and a name for errors (the file, or the folder when sharded)."""
    files = weight_files(folder)
    state = {}
    for path in files:
        state.update(load_file(path))
    return state, files[0] if len(files) == 1 else folder


DREAM_ARCHITECTURES = ("DreamModel",)


def load_diffusion_lm(folder: str, dtype=torch.float32, base: str | None = None) -> tuple[DiffusionLM, str]:
    """A Dream-layout checkpoint, or a LoRA adapter over one.  Returns the model and the folder
    holding the base weights (where its tokenizer lives)."""
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return _load_with_adapter(folder, dtype, base)
    cfg = read_config(folder)
    where = os.path.join(folder, "config.json")
    arch = (cfg.get("architectures") or ["<none>"])[0]
    if arch not in DREAM_ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {arch!r} is not a diffusion LM specplug loads "
                              f"(known: {', '.join(DREAM_ARCHITECTURES)})")
    if cfg.get("mask_token_id") is None:
        raise CheckpointError(f"{where}: no mask_token_id")
    s = Shape.from_config(cfg, where, qkv_bias=True, qk_norm=False)
    vocab, tied = cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False))
    expected = {"model.embed_tokens.weight": (vocab, s.hidden), "model.norm.weight": (s.hidden,)}
    expected.update(expected_layer_keys(s, "model.layers."))
    if not tied:
        expected["lm_head.weight"] = (vocab, s.hidden)
    state, source = load_weights(folder)
    check_keys(state, expected, source)
    model = DiffusionLM(s, vocab, int(cfg["mask_token_id"]), bool(cfg.get("is_causal", False)),
                        bool(cfg.get("shift_logits", True)))
    own = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    if tied:
        own["lm_head.weight"] = own["embed_tokens.weight"]
    model.load_state_dict(own, strict=True)
    return model.to(dtype).eval(), folder


def _load_with_adapter(folder: str, dtype, base: str | None) -> tuple[DiffusionLM, str]:
    cfg_path = os.path.join(folder, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    if acfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {acfg['peft_type']!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if acfg.get(key):
            raise CheckpointError(f"{cfg_path}: per-module {key} is not supported")
    base = base or acfg.get("base_model_name_or_path")
    if base and not os.path.isabs(base) and not os.path.isdir(base):
        base = os.path.join(folder, base)
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{cfg_path}: base model {base!r} not found locally; "
                              f"pass the option base=PATH")
    model, base_folder = load_diffusion_lm(base, torch.float64)
    r, alpha = int(acfg["r"]), float(acfg.get("lora_alpha", acfg["r"]))
    scale = alpha / (math.sqrt(r) if acfg.get("use_rslora") else r)
    merge_lora(model, _adapter_state(folder), scale, folder)
    return model.to(dtype).eval(), base_folder


def _adapter_state(folder: str) -> dict:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_file(path)
    raise CheckpointError(f"{folder}: adapter_config.json but no adapter_model.safetensors/.bin")


def merge_lora(model: nn.Module, adapter: dict, scale: float, where: str) -> None:
    """W += scale * B @ A for each lora_A/lora_B pair; names follow PEFT's
    base_model.model.<module>.lora_{A,B}.weight (adapter names like .default. are allowed)."""
    modules = dict(model.named_modules())
    pairs: dict[str, dict] = {}
    for key, t in adapter.items():
        parts = key.split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            raise CheckpointError(f"{where}: unexpected adapter key {key} (only LoRA A/B are merged)")
        side = "A" if "lora_A" in parts else "B"
        module = ".".join(parts[:parts.index(f"lora_{side}")])
        module = module.removeprefix("base_model.model.").removeprefix("model.")
        pairs.setdefault(module, {})[side] = (key, t)
    for module, ab in pairs.items():
        if module not in modules or not isinstance(modules[module], nn.Linear):
            raise CheckpointError(f"{where}: adapter key {next(iter(ab.values()))[0]} targets "
                                  f"{module}, not a linear layer of the base")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{where}: {module} has lora_{next(iter(ab))} but not its pair")
        lin = modules[module]
        (ka, a), (kb, b) = ab["A"], ab["B"]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{where}: {ka} {tuple(a.shape)} / {kb} {tuple(b.shape)} do not "
                                  f"fit {module} [{lin.out_features}, {lin.in_features}]")
        with torch.no_grad():
            lin.weight += scale * (b.double() @ a.double()).to(lin.weight.dtype)
