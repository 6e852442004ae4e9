"""The canonical drafter description every converter reads into and writes from.

A conversion is  source layout -> (DraftSpec, canonical state dict) -> target layout.
Canonical key names follow the speculators/vLLM naming (`layers.{i}.` everywhere, EAGLE-3's
`midlayer.` is `layers.0.`), so each source and target needs one explicit key table, not one
per (source, target) pair; `converters.keymaps.pair_key_map` composes them for a pair.

Canonical keys per family (H draft hidden, Ht target hidden, V target vocab, Vd draft vocab,
n the number of target layers fed to fc, nh/kv heads, hd head dim, I intermediate size):
  eagle   fc.weight [H, 2H] (+ fc.bias [H]), layers.{i}.self_attn.{q,k,v,o}_proj.weight
          (+ q/k/v biases for Qwen2, + q/k/v/o biases once an fc bias is folded in for vLLM),
          layers.{i}.mlp.{gate,up,down}_proj.weight,
          layers.{i}.post_attention_layernorm.weight, layers.{i}.input_layernorm.weight for
          i > 0 only, optional embed_tokens.weight [V, H]; Qwen3 heads add q_norm/k_norm [hd].
  eagle3  fc.weight [H, n*Ht], layers.0.* with q/k/v input 2H, layers.0.hidden_norm.weight,
          norm.weight, lm_head.weight [Vd, H], d2t int64 [Vd] (offsets), t2d bool [V],
          optional embed_tokens.weight [V, H].
  dflash  fc.weight [H, n*Ht], hidden_norm.weight, layers.{i}.* with q_norm/k_norm [hd],
          norm.weight; no embedding or lm_head (the target's are used).
"""
from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("eagle", "eagle3", "dflash")


class ConvertError(ValueError):
    """Bad input or an impossible conversion: the message is one line naming the problem."""


@dataclass
class DraftSpec:
    family: str  # one of FAMILIES
    arch: str  # decoder flavour: "llama", "qwen2" (qkv biases) or "qwen3" (q_norm/k_norm)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (embedding rows, t2d length)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    torch_dtype: str | None = None
    fc_bias: bool = False
    qkv_bias: bool = False
    attn_o_bias: bool = False  # o_proj biases: an EAGLE-1 fc bias folded in for vLLM (fold.py)
    has_embed: bool = False
    # EAGLE-3
    draft_vocab_size: int | None = None
    target_hidden_size: int | None = None
    num_aux: int = 3  # target layers concatenated before fc
    aux_layer_ids: list[int] | None = None  # HF hidden_states indices (vLLM's convention)
    norm_before_residual: bool = False  # SafeAILab/SpecForge: residual is taken before hidden_norm
    # DFlash (z-lab reads hidden_states[target_layer_ids[j] + 1])
    block_size: int | None = None
    mask_token_id: int | None = None
    target_layer_ids: list[int] | None = None
    num_target_layers: int | None = None
    verifier: str | None = None  # name or path of the target model, when known
    extra: dict = field(default_factory=dict)  # config fields carried through unchanged

    @property
    def target_hidden(self) -> int:
        return self.target_hidden_size or self.hidden_size


def _layer_shapes(spec: DraftSpec, i: int, attn_in: int) -> dict[str, tuple]:
    H, hd = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    p = f"layers.{i}."
    shapes = {
        p + "self_attn.q_proj.weight": (q, attn_in),
        p + "self_attn.k_proj.weight": (kv, attn_in),
        p + "self_attn.v_proj.weight": (kv, attn_in),
        p + "self_attn.o_proj.weight": (H, q),
        p + "mlp.gate_proj.weight": (spec.intermediate_size, H),
        p + "mlp.up_proj.weight": (spec.intermediate_size, H),
        p + "mlp.down_proj.weight": (H, spec.intermediate_size),
        p + "post_attention_layernorm.weight": (H,),
    }
    if spec.qkv_bias:
        shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)})
    if spec.attn_o_bias:
        shapes[p + "self_attn.o_proj.bias"] = (H,)
    if spec.arch == "qwen3":
        shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def canonical_shapes(spec: DraftSpec) -> dict[str, tuple]:
    """Every canonical key of this drafter and its shape (the nanoGPT-style shape table)."""
    H = spec.hidden_size
    shapes: dict[str, tuple] = {}
    if spec.family == "eagle":
        shapes["fc.weight"] = (H, 2 * H)
        if spec.fc_bias:
            shapes["fc.bias"] = (H,)
        for i in range(spec.num_layers):
            shapes.update(_layer_shapes(spec, i, H))
            if i > 0:  # SafeAILab skips layer 0's input_layernorm (fc output goes straight in)
                shapes[f"layers.{i}.input_layernorm.weight"] = (H,)
    elif spec.family == "eagle3":
        shapes["fc.weight"] = (H, spec.num_aux * spec.target_hidden)
        shapes.update(_layer_shapes(spec, 0, 2 * H))  # q/k/v see cat(embed, hidden)
        shapes["layers.0.input_layernorm.weight"] = (H,)
        shapes["layers.0.hidden_norm.weight"] = (H,)
        shapes["norm.weight"] = (H,)
        shapes["lm_head.weight"] = (spec.draft_vocab_size, H)
        shapes["d2t"] = (spec.draft_vocab_size,)
        shapes["t2d"] = (spec.vocab_size,)
    elif spec.family == "dflash":
        shapes["fc.weight"] = (H, len(spec.target_layer_ids or []) * spec.target_hidden)
        shapes["hidden_norm.weight"] = (H,)
        for i in range(spec.num_layers):
            shapes.update(_layer_shapes(spec, i, H))
            shapes[f"layers.{i}.input_layernorm.weight"] = (H,)
        shapes["norm.weight"] = (H,)
    else:
        raise ConvertError(f"unknown drafter family {spec.family!r}")
    if spec.has_embed and spec.family != "dflash":
        shapes["embed_tokens.weight"] = (spec.vocab_size, H)
    return shapes


INDEX_KEYS = ("d2t", "t2d")  # integer/bool buffers; everything else is a float weight
