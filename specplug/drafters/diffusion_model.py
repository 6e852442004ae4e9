"""A small transformer for diffusion drafters, and the SpecDiff checkpoint loader.

Layers use the Llama/Qwen2/Qwen3 key layout (self_attn.{q,k,v,o}_proj, optional q_norm/k_norm,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm) but attend through an
explicit boolean mask over [cached keys, new keys].  So one attention serves three patterns:
causal, bidirectional (masked diffusion), and DFlash's block attending to context features.

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
from torch.nn import functional as F

from ..checkpoint_io import CheckpointError, check_keys, load_file, read_config, weight_files


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # [..., dim]
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope(pos: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [b, n] -> cos, sin [b, 1, n, head_dim]; float32 angles as HF computes them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=pos.device)
                           / head_dim))
    ang = pos[..., None].float() * inv
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.eps)
            self.k_norm = RMSNorm(s.head_dim, s.eps)

    def kv(self, x, pos):
        """x [b, n, H], pos [b, n] -> keys, values [b, kv_heads, n, head_dim] (keys roped)."""
        b, n, _ = x.shape
        k = self.k_proj(x).view(b, n, self.s.kv_heads, self.s.head_dim)
        if self.s.qk_norm:
            k = self.k_norm(k)
        v = self.v_proj(x).view(b, n, self.s.kv_heads, self.s.head_dim).transpose(1, 2)
        cos, sin = rope(pos, self.s.head_dim, self.s.rope_theta, x.dtype)
        return _rotate(k.transpose(1, 2), cos, sin), v

    def forward(self, x, pos, allowed, past=None):
        """x [b, q, H]; pos [b, q]; allowed [b, q, past_len + q] bool; past (k, v) or None.
        Returns output [b, q, H] and this block's (k, v)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.s.heads, self.s.head_dim)
        if self.s.qk_norm:
            q = self.q_norm(q)
        cos, sin = rope(pos, self.s.head_dim, self.s.rope_theta, x.dtype)
        q = _rotate(q.transpose(1, 2), cos, sin)
        k_new, v_new = self.kv(x, pos)
        k, v = k_new, v_new
        if past is not None:
            k, v = torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2)
        groups = self.s.heads // self.s.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                             scale=1.0 / math.sqrt(self.s.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), (k_new, v_new)


class MLP(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden, s.eps)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.eps)

    def forward(self, x, pos, allowed, past=None):
        attn, kv = self.self_attn(self.input_layernorm(x), pos, allowed, past)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class DiffusionLM(nn.Module):
    """Masked-diffusion LM: embeddings, layers, norm, lm_head; attention pattern from the caller."""
    def __init__(self, s: Shape, vocab: int, mask_token_id: int, is_causal: bool = False,
                 shift_logits: bool = True):
        super().__init__()
        self.shape, self.vocab = s, vocab
        self.mask_token_id, self.is_causal, self.shift_logits = mask_token_id, is_causal, shift_logits
        self.embed_tokens = nn.Embedding(vocab, s.hidden)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.eps)
        self.lm_head = nn.Linear(s.hidden, vocab, bias=False)

    def forward(self, ids, pos, allowed, past=None, score=None):
        """ids, pos [b, q]; allowed [b, q, past_len + q]; past: per layer (k, v) or None;
        score [b, m] (optional): the entries to score (the lm_head over every context entry
        would cost more than the layers).  Returns logits [b, q, vocab] (unshifted: row i is
        the output at position i), or [b, m, vocab] for `score`, and the per-layer (k, v)."""
        x = self.embed_tokens(ids)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, pos, allowed, None if past is None else past[i])
            new_kv.append(kv)
        if score is not None:
            x = x[torch.arange(x.shape[0], device=x.device)[:, None], score]
        return self.lm_head(self.norm(x)), new_kv


# -- loading -------------------------------------------------------------------------------------
def expected_layer_keys(s: Shape, prefix: str) -> dict[str, tuple]:
    """Key -> shape for every layer under prefix (e.g. 'model.layers.')."""
    out = {}
    for i in range(s.layers):
        p = f"{prefix}{i}."
        for name, rows in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)):
            out[f"{p}self_attn.{name}_proj.weight"] = (rows * s.head_dim, s.hidden)
            if s.qkv_bias:
                out[f"{p}self_attn.{name}_proj.bias"] = (rows * s.head_dim,)
        out[f"{p}self_attn.o_proj.weight"] = (s.hidden, s.heads * s.head_dim)
        if s.qk_norm:
            out[f"{p}self_attn.q_norm.weight"] = (s.head_dim,)
            out[f"{p}self_attn.k_norm.weight"] = (s.head_dim,)
        out[f"{p}mlp.gate_proj.weight"] = (s.intermediate, s.hidden)
        out[f"{p}mlp.up_proj.weight"] = (s.intermediate, s.hidden)
        out[f"{p}mlp.down_proj.weight"] = (s.hidden, s.intermediate)
        out[f"{p}input_layernorm.weight"] = (s.hidden,)
        out[f"{p}post_attention_layernorm.weight"] = (s.hidden,)
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
