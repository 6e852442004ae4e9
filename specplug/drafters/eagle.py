"""EAGLE-1/2: a one-layer head that extrapolates the target's final hidden state.

Head input for committed token x_j (j >= 1): fc(cat(embed(x_j), f_{j-1})) where f_{j-1} is the
target's final normed hidden state at position j - 1; the decoder layer (no input_layernorm on
layer 0) then predicts f_j, and the target's lm_head turns it into logits for x_{j+1}.  While
drafting, the head's own prediction stands in for the missing target feature.

  committed  x0  x1  x2  x3          (features f0 f1 f2 handed over by the engine)
  entries        (x1,f0) (x2,f1) (x3,f2) -> logits for d1 -> entry (d1, out) -> logits for d2 ...

Each head entry sits at its token's position (x_j at j), as vLLM places them.  Checkpoint layout
(SafeAILab): fc.weight [H, 2H] (+ fc.bias), layers.N.*, embed_tokens.weight (replaced by the
target's when shapes match), no lm_head.  Heterogeneous heads (seed 003): when the config's
hidden_size differs from the target's (config `target_hidden_size`), fc reads [emb, f] in the
target's width and `l2s.weight` [H_target, H] projects the prediction back to a target feature;
a head may bring its own `lm_head.weight` over a reduced vocabulary with `d2t` offsets.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..checkpoint_io import CheckpointError, check_keys, load_state_dict, read_config, weight_files
from ..vocab import VocabMap
from .base import DrafterSpec, Family, TargetInfo, register_drafter
from .eagle_runtime import EagleDrafter
from .decoder_layer import DecoderLayer, LayerShape, Ragged, Rope, layer_keys
from .tree import TreeSettings

EAGLE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                       "EagleLlamaForCausalLM", "LlamaForCausalLMEagle", "EAGLEModel")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers old transformers versions saved
FINAL_HIDDEN = -1  # HF hidden_states index of the final normed hidden state


class EagleHead(nn.Module):
    def __init__(self, cfg: dict, target_hidden: int, emb_size: int, fc_bias: bool,
                 attn_bias: bool, vocab_map: VocabMap | None, own_lm_head: int | None):
        super().__init__()
        self.shape = LayerShape.from_config(cfg, attn_bias=attn_bias)
        hidden = self.shape.hidden
        self.fc = nn.Linear(emb_size + target_hidden, hidden, bias=fc_bias)
        self.layers = nn.ModuleList(DecoderLayer(self.shape, hidden, input_norm=i > 0)
                                    for i in range(int(cfg.get("num_hidden_layers", 1))))
        self.l2s = nn.Linear(hidden, target_hidden, bias=False) if hidden != target_hidden else None
        self.lm_head = nn.Linear(target_hidden, own_lm_head, bias=False) if own_lm_head else None
        self.rope = Rope.from_config(cfg)
        self.vocab_map = vocab_map
        self.embed: nn.Module | None = None  # set by attach(): the target's, or the checkpoint's
        self.target_lm_head: nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                kv, mask: torch.Tensor, from_target: bool, logits_at: torch.Tensor | None = None,
                ragged: Ragged | None = None):
        """tokens [b, q], feats [b, q, H_target] (target features or the head's own outputs:
        both live in the target's feature space), positions [b, q], mask [b, q, slots];
        logits_at [b] (optional): score only that entry of each row; ragged (optional): the
        entries that are not padding, the only ones the position-wise work runs on.
        Returns (predicted features [b, q, H_target], logits [b, q, target_vocab], or [b, 1, V]
        with logits_at)."""
        if ragged is not None:
            tokens, feats = ragged.pack(tokens), ragged.pack(feats)
        x = self.fc(torch.cat([self.embed(tokens).to(feats.dtype), feats], dim=-1))
        rope = self.rope(x, positions)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x) if i > 0 else x
            x = x + layer.self_attn(h, rope, mask, kv.extend_for(i), ragged)
            x = layer.feed_forward(x)
        if ragged is not None:
            x = ragged.unpack(x)
        out = self.l2s(x) if self.l2s is not None else x
        if logits_at is None:
            scored = out
        else:
            scored = out[torch.arange(out.shape[0], device=out.device), logits_at][:, None]
        if self.lm_head is None:
            return out, self.target_lm_head(scored)
        logits = self.lm_head(scored)
        return out, self.vocab_map.logits_to_target(logits) if self.vocab_map else logits


def strip_prefixes(state: dict) -> dict:
    """Drop wrapper prefixes training code adds (`draft_model.`, `model.`) and saved rope buffers."""
    out = {}
    for key, value in state.items():
        for prefix in ("draft_model.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.endswith(_IGNORED_SUFFIXES):
            out[key] = value
    return out


def where(path: str) -> str:
    files = weight_files(path)
    return files[0] if len(files) == 1 else f"{path} (sharded)"


def read_eagle_checkpoint(path: str, target: TargetInfo | None = None) -> tuple[dict, dict]:
    """Normalised state dict (SafeAILab key names) and config of an EAGLE-1/2 head folder.
    Raises CheckpointError naming the file and key on unknown architecture, missing/unexpected
    keys and wrong shapes."""
    cfg = read_config(path)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in EAGLE_ARCHITECTURES:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: unknown EAGLE architecture "
                              f"{arch!r} (expected one of {', '.join(EAGLE_ARCHITECTURES)})")
    state = strip_prefixes(load_state_dict(path))
    check_keys(state, expected_eagle_keys(cfg, state, target), where(path),
               optional={"embed_tokens.weight", "fc.bias", "t2d"})
    return state, cfg


def expected_eagle_keys(cfg: dict, state: dict, target: TargetInfo | None) -> dict[str, tuple]:
    attn_bias = "layers.0.self_attn.q_proj.bias" in state or bool(cfg.get("attention_bias"))
    shape = LayerShape.from_config(cfg, attn_bias=attn_bias)
    h = shape.hidden
    h_t = _target_hidden(cfg, target)
    vocab = int(cfg["vocab_size"])
    emb = state.get("embed_tokens.weight")
    emb_size = emb.shape[1] if emb is not None else h_t
    keys = {"fc.weight": (h, emb_size + h_t), "fc.bias": (h,), "embed_tokens.weight": (vocab, emb_size)}
    for i in range(int(cfg.get("num_hidden_layers", 1))):
        keys.update(layer_keys(f"layers.{i}.", shape, h, input_norm=i > 0))
    if h != h_t:
        keys["l2s.weight"] = (h_t, h)
    if "lm_head.weight" in state:
        draft_vocab = int(cfg.get("draft_vocab_size") or state["lm_head.weight"].shape[0])
        keys["lm_head.weight"] = (draft_vocab, h_t)
        if draft_vocab != (target.vocab_size if target else vocab):
            keys["d2t"] = (draft_vocab,)
            keys["t2d"] = (target.vocab_size if target else vocab,)
    return keys


def _target_hidden(cfg: dict, target: TargetInfo | None) -> int:
    h_t = int(cfg.get("target_hidden_size") or cfg["hidden_size"])
    if target is not None and target.hidden_size != h_t:
        raise CheckpointError(f"EAGLE head expects target hidden size {h_t}, the target has "
                              f"{target.hidden_size}")
    return h_t


def load_eagle(path: str, target: TargetInfo, options: dict | None = None) -> EagleDrafter:
    state, cfg = read_eagle_checkpoint(path, target)
    options = options or {}
    h_t = target.hidden_size
    vocab_map = VocabMap(state["d2t"].to(target.device), target.vocab_size) if "d2t" in state else None
    emb_size = state["embed_tokens.weight"].shape[1] if "embed_tokens.weight" in state else h_t
    own_head = state["lm_head.weight"].shape[0] if "lm_head.weight" in state else None
    if own_head is None and target.lm_head is None:
        raise CheckpointError(f"{where(path)}: no lm_head.weight and the target lends none")
    head = EagleHead(cfg, h_t, emb_size, "fc.bias" in state,
                     "layers.0.self_attn.q_proj.bias" in state, vocab_map, own_head)
    head.embed = _embedding(state, target, path)
    head.target_lm_head = target.lm_head
    weights = {k: v for k, v in state.items() if k not in ("embed_tokens.weight", "d2t", "t2d")}
    head.load_state_dict(weights, strict=False)
    _check_loaded(head, weights, path)
    head.to(device=target.device, dtype=target.dtype)  # beside the target, in its dtype
    return EagleDrafter(head, (FINAL_HIDDEN,), TreeSettings.from_options(options),
                        float(options.get("min_confidence", 0.0)))


def _embedding(state: dict, target: TargetInfo, path: str) -> nn.Module:
    """The target's embedding when it fits (EAGLE heads train with it frozen), else the head's."""
    own = state.get("embed_tokens.weight")
    lent = target.embed_tokens
    if lent is not None and (own is None or tuple(lent.weight.shape) == tuple(own.shape)):
        return lent
    if own is None:
        raise CheckpointError(f"{where(path)}: no embed_tokens.weight and the target lends none")
    return nn.Embedding.from_pretrained(own.to(target.dtype), freeze=True)


def _check_loaded(module: nn.Module, weights: dict, path: str) -> None:
    """Every parameter of the head came from the checkpoint (the target's modules aside)."""
    names = {n for n, _ in module.named_parameters()
             if not n.startswith(("embed.", "target_lm_head.", "rope."))}
    missing = sorted(names - set(weights))
    if missing:
        raise CheckpointError(f"{where(path)}: missing key {missing[0]}")


FAMILY = Family("eagle", needs_weights=True, reads_hidden_states=True,
                 architectures=("LlamaForCausalLMEagle", "EagleLlamaForCausalLM"),
                 vllm_method="eagle", sglang_algorithm="EAGLE",
                 sglang_plugin_name="SPECPLUG_EAGLE")


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> EagleDrafter:
    if not spec.path:
        raise ValueError("method 'eagle' needs --drafter PATH (an EAGLE-1/2 head folder)")
    return load_eagle(spec.path, target, spec.options)
