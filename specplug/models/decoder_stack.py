"""A Llama-family HF causal LM run through specplug's own DecoderLayer, on the HF model's own
modules (nothing copied): the embedded engine's target and the draft model without
transformers' per-call machinery (output capturing hooks, mask and cache dispatch, kwargs
plumbing through every module), which cost a few ms of a 17 ms decode step of SmolLM2-135M.

It takes what SlotCache.forward hands an HF model and returns what the engine reads
(`logits`, `hidden_states` in HF's convention: 0 = embeddings, i = output of layer i, the last
one after the final norm).  Layers attend through the transformers Cache the SlotCache holds.
Models it does not cover (another architecture, sliding windows, another attention
implementation) keep HF's forward: `decoder_stack_for` says why in the log.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..drafters.decoder_layer import DecoderLayer, LayerShape, Rope, rope_for_heads
from .attention import tile_for_groups
from .packed_linear import fuse_linears

log = logging.getLogger("specplug")

# HF model types whose decoder layer is DecoderLayer's: pre-norm, RMSNorm, rotary attention with
# q/k/v/o projections (biases as configured), SwiGLU MLP; Qwen3 adds per-head q/k norms
COVERED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class StackOutput:
    logits: torch.Tensor  # [b, q, vocab]
    hidden_states: tuple[torch.Tensor, ...] | None  # each [b, q, hidden], when asked for


class DecoderStack(nn.Module):
    def __init__(self, model):
        """model: an HF *ForCausalLM of a COVERED type; its modules are shared, not copied."""
        super().__init__()
        inner, cfg = model.model, model.config
        self.config = cfg
        qk_norm = hasattr(inner.layers[0].self_attn, "q_norm")
        shape = LayerShape.from_config(cfg.to_dict(), qk_norm=qk_norm)
        self.embed_tokens, self.norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.groups = shape.heads // shape.kv_heads  # query heads per key/value head
        # HF's own rotary module: the same cos/sin for every rope variant it knows
        self.rope = Rope(shape.head_dim, 0.0, hf=inner.rotary_emb)
        with torch.device("meta"):  # shells: every weight is the HF model's
            self.layers = nn.ModuleList(DecoderLayer(shape) for _ in inner.layers)
        for ours, theirs in zip(self.layers, inner.layers):
            _share(ours, theirs)
        fuse_linears(self.layers)  # q/k/v and gate/up as one packed product each (CPU)
        left = [n for n, p in self.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"no HF weight for {left[0]}")

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_values, use_cache: bool = True,
                output_hidden_states: bool = False, logits_to_keep: int = 0) -> StackOutput:
        """input_ids, position_ids [b, q]; attention_mask [b, 1, q, n] additive over the n
        cached + new slots; past_key_values: a transformers Cache (SlotCache.cache);
        logits_to_keep: logits of the last n inputs only (0: all; a prefill wants 1)."""
        x = self.embed_tokens(input_ids)
        # cos/sin shaped for the heads once, not in every layer
        rope = rope_for_heads(self.rope(x, position_ids), x.dtype)
        # every layer attends under the same mask: tiled for grouped attention once, here
        mask = tile_for_groups(attention_mask, self.groups)[:, 0]
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, lambda k, v, i=i: past_key_values.update(k, v, i))
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # HF's last hidden state is the normed one
        return StackOutput(self.lm_head(x[:, -logits_to_keep:]),
                           tuple(hidden) if hidden is not None else None)


def _share(ours: DecoderLayer, theirs: nn.Module) -> None:
    """Put HF layer `theirs`'s modules and norm weights into DecoderLayer `ours`."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(ours.self_attn, name, getattr(theirs.self_attn, name))
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(ours.mlp, name, getattr(theirs.mlp, name))
    norms = [("input_layernorm", ours, theirs), ("post_attention_layernorm", ours, theirs)]
    if hasattr(ours.self_attn, "q_norm"):
        norms += [("q_norm", ours.self_attn, theirs.self_attn),
                  ("k_norm", ours.self_attn, theirs.self_attn)]
    for name, mine, hf in norms:
        getattr(mine, name).weight = getattr(hf, name).weight


def decoder_stack_for(model) -> DecoderStack | None:
    """The model's DecoderStack, or None (logged why) where HF's forward must run."""
    cfg = model.config
    why = None
    if cfg.model_type not in COVERED:
        why = f"model type {cfg.model_type!r}"
    elif getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "specplug_sdpa"):
        why = f"attention {cfg._attn_implementation!r}"
    elif getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        why = "sliding-window attention"
    elif getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        why = "an activation or tensor-parallel layout of its own"
    elif not all(hasattr(model, "model") and hasattr(model.model, a)
                 for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
        why = "no HF Llama module layout"
    if why is None:
        try:
            return DecoderStack(model)
        except (ValueError, AttributeError, TypeError) as e:
            why = str(e)
    log.info("%s runs through transformers' forward: %s", type(model).__name__, why)
    return None
