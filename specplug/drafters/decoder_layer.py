"""The one decoder layer every specplug head is built from (EAGLE-1/2, EAGLE-3, DFlash, SpecDiff):
Llama/Qwen2/Qwen3-style, q/k norms and biases optional, RMSNorm computed in float32 as HF does.

Attention reads keys and values through the caller's `extend(k_new, v_new)`, which appends this
block's entries to whatever cache the caller keeps and returns every entry the block may see,
under an explicit boolean mask.  So one attention serves a causal chain, a tree (a block mask),
a bidirectional diffusion block and DFlash's block over target-feature context.

Parameter names follow HF Llama (`self_attn.q_proj`, `mlp.gate_proj`, `post_attention_layernorm`,
...) so checkpoints load with a plain `load_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import grouped_attention

# extend(k_new, v_new) [b, kv_heads, q, head_dim] -> every (keys, values) [b, kv_heads, n, head_dim]
# the block attends to, its own entries included, in the mask's slot order
Extend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float = 1e-6
    attn_bias: bool = False  # q/k/v projections (Qwen2, some EAGLE heads)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3, DFlash)
    act: str = "silu"

    @staticmethod
    def from_config(cfg: dict, attn_bias: bool | None = None, qk_norm: bool = False) -> "LayerShape":
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return LayerShape(hidden=hidden, heads=heads,
                          kv_heads=int(cfg.get("num_key_value_heads") or heads),
                          head_dim=int(cfg.get("head_dim") or hidden // heads),
                          intermediate=int(cfg["intermediate_size"]),
                          eps=float(cfg.get("rms_norm_eps", 1e-6)),
                          attn_bias=bool(cfg.get("attention_bias", False)) if attn_bias is None
                          else attn_bias,
                          mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=qk_norm,
                          act=str(cfg.get("hidden_act", "silu")))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., size]
        # float32 statistics whatever x's dtype, as HF's Llama/Qwen norms (bf16 would drift):
        # torch's fused rms_norm computes a bf16 input in float32 and rounds once, so it gives
        # HF's upcast-normalise-round bit for bit (fp64/fp32/bf16, tests/core/
        # test_decoder_stack.py) in one kernel where that took five (bf16, 576 wide: 29 -> 14 us)
        # (HF computes even a float64 norm in float32: so does this)
        xf = x.float() if x.dtype == torch.float64 else x
        return self.weight * F.rms_norm(xf, (x.shape[-1],), eps=self.eps).to(x.dtype)


class Rope(nn.Module):
    """Rotary embedding: positions [b, q] -> (cos, sin) [b, q, head_dim] in `like`'s dtype.
    The default rope is computed here (float32 angles, as HF); scaled variants (llama3, yarn,
    ...) come from HF's Llama rotary embedding (`hf`), built from the head's config."""

    def __init__(self, head_dim: int, theta: float, hf: nn.Module | None = None):
        super().__init__()
        self.head_dim, self.theta, self.hf = head_dim, theta, hf

    @staticmethod
    def from_config(cfg: dict) -> "Rope":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
        theta = float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0))
        return Rope(dim, theta, _hf_rotary(cfg) if kind != "default" else None)

    def forward(self, like: torch.Tensor, positions: torch.Tensor):
        """like: any tensor of the wanted dtype; positions [b, q]."""
        if self.hf is not None:
            return self.hf(like, positions)
        # frequencies made per call, in float32: a buffer would be cast to a bf16 head's dtype
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device)
        inv_freq = 1.0 / (self.theta ** (steps.float() / self.head_dim))  # [head_dim / 2]
        angles = positions[..., None].float() * inv_freq  # [b, q, head_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def _hf_rotary(cfg: dict) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    keys = ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings",
            "rope_theta", "rope_scaling", "rope_parameters")
    return LlamaRotaryEmbedding(LlamaConfig(**{k: cfg[k] for k in keys if cfg.get(k) is not None}))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, q, head_dim]; cos, sin [b, q, head_dim], or [b, 1, q, head_dim] in x's
    dtype already (a stack of layers shapes them once: rope_for_heads)."""
    if cos.dim() == 3:
        cos, sin = rope_for_heads((cos, sin), x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_for_heads(rope, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [b, q, head_dim] -> [b, 1, q, head_dim] in `dtype`: what apply_rope
    broadcasts over heads."""
    return rope[0][:, None].to(dtype), rope[1][:, None].to(dtype)


class Ragged:
    """The real entries of a padded block [b, q] (a batch of rows fed different numbers of
    tokens).  Position-wise work (projections, norms, MLP) runs on the packed real entries
    [N, ...]; only attention needs the block's [b, q] layout.  A catch-up pass over prompts of
    mixed lengths is mostly padding: packing skips its projections and MLP."""

    def __init__(self, b: int, q: int, index: torch.Tensor):  # index [N]: flat real entries
        self.b, self.q, self.index = b, q, index

    @staticmethod
    def from_counts(counts: list[int], q: int, device) -> "Ragged":
        """Row r's first counts[r] entries are real.  Laid out from host counts and copied
        over once: no device sync, unlike finding them in a mask."""
        index = [r * q + j for r, n in enumerate(counts) for j in range(n)]
        return Ragged(len(counts), q, torch.tensor(index, dtype=torch.long, device="cpu")
                      .to(device))

    @staticmethod
    def from_mask(real: torch.Tensor) -> "Ragged":
        """real [b, q] bool.  Finding the entries is a host sync (nonzero)."""
        return Ragged(real.shape[0], real.shape[1], real.reshape(-1).nonzero().squeeze(1))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """t [b, q, ...] -> [N, ...]."""
        return t.reshape(self.b * self.q, *t.shape[2:])[self.index]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """t [N, ...] -> [b, q, ...], zeros at padding."""
        out = t.new_zeros(self.b * self.q, *t.shape[1:])
        out[self.index] = t
        return out.view(self.b, self.q, *t.shape[1:])


class Attention(nn.Module):
    # linears that read one input: packed as one product on the CPU (fuse_linears)
    FUSABLE = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, shape: LayerShape, in_size: int | None = None):
        super().__init__()
        s, width = shape, in_size or shape.hidden
        self.shape = s
        self.q_proj = nn.Linear(width, s.heads * s.head_dim, bias=s.attn_bias)
        self.k_proj = nn.Linear(width, s.kv_heads * s.head_dim, bias=s.attn_bias)
        self.v_proj = nn.Linear(width, s.kv_heads * s.head_dim, bias=s.attn_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.eps)
            self.k_norm = RMSNorm(s.head_dim, s.eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., in] -> q, k, v projections: one fused product where `qkv` was set
        (models/packed_linear.py, fuse_linears), three otherwise."""
        fused = getattr(self, "qkv", None)
        if fused is not None:
            return fused(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def keys_values(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, n, in]; rope (cos, sin) [b, n, head_dim] -> keys (roped), values
        [b, kv_heads, n, head_dim]."""
        return self._heads(self.k_proj(x), self.v_proj(x), rope)

    def _heads(self, k: torch.Tensor, v: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected k, v [b, n, kv_heads * head_dim] -> keys (normed, roped), values
        [b, kv_heads, n, head_dim]."""
        b, n, _ = k.shape
        s = self.shape
        k = k.view(b, n, s.kv_heads, s.head_dim)
        if s.qk_norm:
            k = self.k_norm(k)
        v = v.view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
        return apply_rope(k.transpose(1, 2), *rope), v

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor, extend: Extend,
                ragged: Ragged | None = None) -> torch.Tensor:
        """x [b, q, in], or [N, in] packed by `ragged`; rope (cos, sin) [b, q, head_dim]; mask
        [b, q, n] bool or additive over the entries `extend` returns (True = may attend), or
        [b, groups * q, n] tiled once for every layer (attention.tile_for_groups) ->
        [b, q, hidden] ([N, hidden] packed)."""
        spread = ragged.unpack if ragged is not None else (lambda t: t)
        qs, ks, vs = self.project(x)
        qs = spread(qs)
        b, q, _ = qs.shape
        s = self.shape
        qs = qs.view(b, q, s.heads, s.head_dim)
        if s.qk_norm:
            qs = self.q_norm(qs)
        qs = apply_rope(qs.transpose(1, 2), *rope)
        keys, values = extend(*self._heads(spread(ks), spread(vs), rope))
        # query head i reads kv head i // (heads / kv_heads) without a copy: repeating the
        # cached keys per query head copied the whole cache every call (measured: 8x slower on
        # a one-token draft step over 450 slots at batch 80, CPU)
        out = grouped_attention(qs, keys, values, mask[:, None])
        out = out.transpose(1, 2).reshape(b, q, s.heads * s.head_dim)
        return self.o_proj(ragged.pack(out) if ragged is not None else out)


class MLP(nn.Module):
    FUSABLE = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, shape: LayerShape):
        super().__init__()
        from transformers.activations import ACT2FN
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=shape.mlp_bias)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=shape.mlp_bias)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=shape.mlp_bias)
        self.act = ACT2FN[shape.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., hidden]
        fused = getattr(self, "gate_up", None)  # one product where fuse_linears set it
        gate, up = fused(x) if fused is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer.  `input_norm` False drops input_layernorm (EAGLE-1 layer 0);
    `hidden_norm` adds EAGLE-3's second norm; `qkv_in` is the attention's input width (EAGLE-3
    attends over [embedding, feature], twice the hidden size)."""

    def __init__(self, shape: LayerShape, qkv_in: int | None = None, input_norm: bool = True,
                 hidden_norm: bool = False):
        super().__init__()
        self.self_attn = Attention(shape, qkv_in)
        self.mlp = MLP(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.eps)
        if input_norm:
            self.input_layernorm = RMSNorm(shape.hidden, shape.eps)
        if hidden_norm:
            self.hidden_norm = RMSNorm(shape.hidden, shape.eps)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor, extend: Extend,
                ragged: Ragged | None = None) -> torch.Tensor:
        """The whole layer: x [b, q, hidden] -> [b, q, hidden], or [N, hidden] packed by
        `ragged` (see Attention.forward)."""
        h = self.input_layernorm(x) if hasattr(self, "input_layernorm") else x
        return self.feed_forward(x + self.self_attn(h, rope, mask, extend, ragged))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The post-attention half: x + mlp(norm(x)); x [..., hidden]."""
        return x + self.mlp(self.post_attention_layernorm(x))


def layer_keys(prefix: str, shape: LayerShape, qkv_in: int | None = None, input_norm: bool = True,
               hidden_norm: bool = False) -> dict[str, tuple]:
    """Checkpoint key -> shape for one DecoderLayer under `prefix` (e.g. 'layers.0.')."""
    s, width = shape, qkv_in or shape.hidden
    keys = {f"{prefix}self_attn.o_proj.weight": (s.hidden, s.heads * s.head_dim),
            f"{prefix}mlp.gate_proj.weight": (s.intermediate, s.hidden),
            f"{prefix}mlp.up_proj.weight": (s.intermediate, s.hidden),
            f"{prefix}mlp.down_proj.weight": (s.hidden, s.intermediate),
            f"{prefix}post_attention_layernorm.weight": (s.hidden,)}
    for name, rows in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)):
        keys[f"{prefix}self_attn.{name}_proj.weight"] = (rows * s.head_dim, width)
        if s.attn_bias:
            keys[f"{prefix}self_attn.{name}_proj.bias"] = (rows * s.head_dim,)
    if s.mlp_bias:
        keys[f"{prefix}mlp.gate_proj.bias"] = (s.intermediate,)
        keys[f"{prefix}mlp.up_proj.bias"] = (s.intermediate,)
        keys[f"{prefix}mlp.down_proj.bias"] = (s.hidden,)
    if s.qk_norm:
        keys[f"{prefix}self_attn.q_norm.weight"] = (s.head_dim,)
        keys[f"{prefix}self_attn.k_norm.weight"] = (s.head_dim,)
    if input_norm:
        keys[f"{prefix}input_layernorm.weight"] = (s.hidden,)
    if hidden_norm:
        keys[f"{prefix}hidden_norm.weight"] = (s.hidden,)
    return keys
