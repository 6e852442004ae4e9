"""Llama-style pieces for drafter heads (EAGLE-1/2/3): a decoder layer whose attention reads an
explicit per-head KV cache under an explicit boolean mask, so a head can attend to committed
entries, to its own chain, or to a node's tree ancestors only.

Parameter names follow HF Llama (`self_attn.q_proj`, `mlp.gate_proj`, `post_attention_layernorm`,
...) so checkpoints load with a plain `load_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    attn_bias: bool = False
    mlp_bias: bool = False
    act: str = "silu"

    @staticmethod
    def from_config(cfg: dict, attn_bias: bool | None = None) -> "HeadShape":
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        bias = bool(cfg.get("attention_bias", False)) if attn_bias is None else attn_bias
        return HeadShape(hidden=hidden, heads=heads,
                         kv_heads=int(cfg.get("num_key_value_heads") or heads),
                         head_dim=int(cfg.get("head_dim") or hidden // heads),
                         intermediate=int(cfg["intermediate_size"]),
                         eps=float(cfg.get("rms_norm_eps", 1e-6)), attn_bias=bias,
                         mlp_bias=bool(cfg.get("mlp_bias", False)),
                         act=str(cfg.get("hidden_act", "silu")))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotary(cfg: dict) -> nn.Module:
    """HF's Llama rotary embedding built from the head's config (handles rope_scaling types)."""
    from transformers import LlamaConfig
    keys = ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings",
            "rope_theta", "rope_scaling", "rope_parameters")
    return _Rotary(LlamaConfig(**{k: cfg[k] for k in keys if cfg.get(k) is not None}))


class _Rotary(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        self.inner = LlamaRotaryEmbedding(config)

    def forward(self, like: torch.Tensor, positions: torch.Tensor):  # positions [b, q]
        return self.inner(like, positions)


class HeadKV:
    """KV cache of a head's layers for a batch of rows, slots appended block by block.

    valid[r, s] marks the slots holding committed entries of row r; blocks appended while
    drafting stay invalid and are cropped when drafting ends, so rollback is a crop.
    """
    def __init__(self, num_layers: int, device: torch.device | str | None = None, batch: int = 0):
        self.num_layers = num_layers
        # the head's, and so the target's (None: torch's default device)
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [b, kv_heads, slots, d]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # [b, slots]
        # [b, slots] entry position
        self.pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def extend(self, positions: torch.Tensor) -> int:
        """Reserve a block of (invalid) slots; returns its first slot index.  positions [b, q]."""
        start = self.width
        self.valid = torch.cat([self.valid, torch.zeros_like(positions, dtype=torch.bool)], 1)
        self.pos = torch.cat([self.pos, positions], 1)
        return start

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, kv_heads, q, d] for the block just reserved; returns the full keys/values."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], 2)
            self.values[layer] = torch.cat([self.values[layer], v], 2)
        return self.keys[layer], self.values[layer]

    def truncate(self, row: int, length: int) -> None:
        """Forget row's entries at positions >= length."""
        self.valid[row] &= self.pos[row] < length

    def crop(self, width: int) -> None:
        self.valid, self.pos = self.valid[:, :width], self.pos[:, :width]
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, :width]
                self.values[i] = self.values[i][:, :, :width]
        used = self.valid.any(0).nonzero()
        # the host decides how far to crop: one sync per call
        last = int(used[-1]) + 1 if len(used) else 0
        if last < self.width:
            self.crop(last)
        elif self.width > 64 and int(self.valid.sum(1).max()) * 2 < self.width:
            self._compact()

    def select_rows(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.valid, self.pos = self.valid[idx], self.pos[idx]
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i], self.values[i] = self.keys[i][idx], self.values[i][idx]

    def add_rows(self, n: int) -> None:
        self.valid = torch.cat([self.valid, self.valid.new_zeros(n, self.width)])
        self.pos = torch.cat([self.pos, self.pos.new_zeros(n, self.width)])
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                pad = self.keys[i].new_zeros((n,) + tuple(self.keys[i].shape[1:]))
                self.keys[i] = torch.cat([self.keys[i], pad])
                self.values[i] = torch.cat([self.values[i], pad.clone()])

    def _compact(self) -> None:
        """Move each row's valid slots to the front (stable), dropping holes."""
        width = int(self.valid.sum(1).max())
        order = torch.sort((~self.valid).long(), dim=1, stable=True).indices[:, :width]
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                k = self.keys[i]
                idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                self.keys[i] = k.gather(2, idx)
                self.values[i] = self.values[i].gather(2, idx)
        self.valid, self.pos = self.valid.gather(1, order), self.pos.gather(1, order)


class HeadAttention(nn.Module):
    def __init__(self, shape: HeadShape, in_size: int):
        super().__init__()
        s = shape
        self.shape = s
        self.q_proj = nn.Linear(in_size, s.heads * s.head_dim, bias=s.attn_bias)
        self.k_proj = nn.Linear(in_size, s.kv_heads * s.head_dim, bias=s.attn_bias)
        self.v_proj = nn.Linear(in_size, s.kv_heads * s.head_dim, bias=s.attn_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, rope, kv: HeadKV, layer: int,
                mask: torch.Tensor) -> torch.Tensor:
        """x [b, q, in]; rope (cos, sin) [b, q, d]; mask [b, q, slots] bool over the cache's
        slots after this block is appended (True = may attend)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        b, q, _ = x.shape
        s = self.shape
        qs = self.q_proj(x).view(b, q, s.heads, s.head_dim).transpose(1, 2)
        ks = self.k_proj(x).view(b, q, s.kv_heads, s.head_dim).transpose(1, 2)
        vs = self.v_proj(x).view(b, q, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = rope
        qs, ks = apply_rotary_pos_emb(qs, ks, cos.to(qs.dtype), sin.to(qs.dtype))
        keys, values = kv.append(layer, ks, vs)
        groups = s.heads // s.kv_heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, q, s.heads * s.head_dim))


class HeadMLP(nn.Module):
    def __init__(self, shape: HeadShape):
        super().__init__()
        from transformers.activations import ACT2FN
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=shape.mlp_bias)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=shape.mlp_bias)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=shape.mlp_bias)
        self.act = ACT2FN[shape.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class HeadLayer(nn.Module):
    """One decoder layer.  `input_norm` False drops input_layernorm (EAGLE-1 layer 0);
    `hidden_norm` adds EAGLE-3's second norm; `qkv_in` is the attention's input width."""
    def __init__(self, shape: HeadShape, qkv_in: int, input_norm: bool = True,
                 hidden_norm: bool = False):
        super().__init__()
        self.self_attn = HeadAttention(shape, qkv_in)
        self.mlp = HeadMLP(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.eps)
        if input_norm:
            self.input_layernorm = RMSNorm(shape.hidden, shape.eps)
        if hidden_norm:
            self.hidden_norm = RMSNorm(shape.hidden, shape.eps)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The post-attention half: x + mlp(norm(x))."""
        return x + self.mlp(self.post_attention_layernorm(x))


def layer_keys(prefix: str, shape: HeadShape, qkv_in: int, input_norm: bool,
               hidden_norm: bool = False) -> dict[str, tuple]:
    """Expected checkpoint keys -> shapes for one HeadLayer under `prefix` (e.g. 'layers.0.')."""
    s = shape
    keys = {
        f"{prefix}self_attn.q_proj.weight": (s.heads * s.head_dim, qkv_in),
        f"{prefix}self_attn.k_proj.weight": (s.kv_heads * s.head_dim, qkv_in),
        f"{prefix}self_attn.v_proj.weight": (s.kv_heads * s.head_dim, qkv_in),
        f"{prefix}self_attn.o_proj.weight": (s.hidden, s.heads * s.head_dim),
        f"{prefix}mlp.gate_proj.weight": (s.intermediate, s.hidden),
        f"{prefix}mlp.up_proj.weight": (s.intermediate, s.hidden),
        f"{prefix}mlp.down_proj.weight": (s.hidden, s.intermediate),
        f"{prefix}post_attention_layernorm.weight": (s.hidden,),
    }
    if s.attn_bias:
        keys[f"{prefix}self_attn.q_proj.bias"] = (s.heads * s.head_dim,)
        keys[f"{prefix}self_attn.k_proj.bias"] = (s.kv_heads * s.head_dim,)
        keys[f"{prefix}self_attn.v_proj.bias"] = (s.kv_heads * s.head_dim,)
    if s.mlp_bias:
        keys[f"{prefix}mlp.gate_proj.bias"] = (s.intermediate,)
        keys[f"{prefix}mlp.up_proj.bias"] = (s.intermediate,)
        keys[f"{prefix}mlp.down_proj.bias"] = (s.hidden,)
    if input_norm:
        keys[f"{prefix}input_layernorm.weight"] = (s.hidden,)
    if hidden_norm:
        keys[f"{prefix}hidden_norm.weight"] = (s.hidden,)
    return keys
