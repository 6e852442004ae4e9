"""EAGLE-3: a head over several target layers' hidden states with its own reduced-vocab lm_head.

Head input for committed token x_j: g_{j-1} = cat of the target's aux hidden states at position
j - 1, h = fc(g) [H]; the midlayer attends over cat(input_layernorm(embed(x_j)), hidden_norm(h))
(input 2H), the residual is h (or hidden_norm(h) with `norm_before_residual`), then the usual
post-attention MLP.  logits = lm_head(norm(out)) over the draft vocabulary, mapped to target ids
by d2t offsets (target_id = i + d2t[i]).  While drafting, `out` (before norm) replaces h.

Aux layers, as HF `hidden_states` indices (0 = embeddings, i = input of layer i = output of
layer i - 1, L = final output AFTER the final norm in HF):
  * config `eagle_aux_hidden_state_layer_ids` (speculators / vLLM): index = id, because vLLM
    collects `hidden_states + residual` before running layer id;
  * config `eagle_config.eagle_aux_hidden_state_layer_ids` (SpecForge / SGLang): index = id + 1,
    because SpecForge hooks the OUTPUT of layer id and SGLang captures `id + 1` for that reason;
  * neither: vLLM's and SGLang's default [2, L // 2, L - 3] (SpecForge's [1, L//2 - 1, L - 4] + 1).
  * option `aux_hidden_indices` overrides all of these.

Layouts: SafeAILab and SpecForge save `midlayer.*`, `fc`, `norm`, `lm_head`, `embed_tokens`, `d2t`,
`t2d`; speculators / vLLM name the layer `layers.0.`; SpecForge training folders may prefix
every key with `draft_model.` and keep d2t/t2d in a `*vocab_mapping*.pt` file beside the weights.
"""
from __future__ import annotations

import glob
import os

import torch
from torch import nn

from ..checkpoint_io import CheckpointError, check_keys, load_state_dict, read_config
from ..vocab import VocabMap
from .base import DrafterSpec, Family, TargetInfo, register_drafter
from .eagle import _check_loaded, _embedding, strip_prefixes, where
from .eagle_runtime import EagleDrafter
from .decoder_layer import DecoderLayer, LayerShape, Ragged, RMSNorm, Rope, layer_keys
from .speculators_format import native_config
from .tree import TreeSettings

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Qwen3ForCausalLMEagle3",
                        "Qwen2ForCausalLMEagle3", "Eagle3Speculator")


class Eagle3Head(nn.Module):
    def __init__(self, cfg: dict, fc_in: int, emb_size: int, attn_bias: bool, draft_vocab: int,
                 vocab_map: VocabMap | None, norm_before_residual: bool):
        super().__init__()
        self.shape = LayerShape.from_config(cfg, attn_bias=attn_bias)
        h = self.shape.hidden
        self.fc = nn.Linear(fc_in, h, bias=False)
        self.midlayer = DecoderLayer(self.shape, emb_size + h, input_norm=True, hidden_norm=True)
        if emb_size != h:  # input_layernorm normalises the embedding, in its own width
            self.midlayer.input_layernorm = RMSNorm(emb_size, self.shape.eps)
        self.norm = RMSNorm(h, self.shape.eps)
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)
        self.rope = Rope.from_config(cfg)
        self.vocab_map = vocab_map
        self.norm_before_residual = norm_before_residual
        self.embed: nn.Module | None = None

    num_layers = 1

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                kv, mask: torch.Tensor, from_target: bool, logits_at: torch.Tensor | None = None,
                ragged: Ragged | None = None):
        """tokens [b, q]; feats [b, q, n_aux * H_target] from the target, else [b, q, H] (the
        head's previous output); positions [b, q]; mask [b, q, slots]; logits_at [b] (optional):
        score only that entry of each row (a catch-up pass needs the last one alone); ragged
        (optional): the entries of the [b, q] block that are not padding, the only ones the
        position-wise work runs on (padding's outputs are zeros).
        Returns (out [b, q, H] before the final norm, logits [b, q, target_vocab], or [b, 1, V]
        with logits_at)."""
        if ragged is not None:
            tokens, feats = ragged.pack(tokens), ragged.pack(feats)
        h = self.fc(feats) if from_target else feats
        layer = self.midlayer
        emb = layer.input_layernorm(self.embed(tokens).to(h.dtype))
        normed = layer.hidden_norm(h)
        residual = normed if self.norm_before_residual else h
        rope = self.rope(h, positions)
        x = residual + layer.self_attn(torch.cat([emb, normed], -1), rope, mask, kv.extend_for(0),
                                       ragged)
        x = layer.feed_forward(x)
        if ragged is not None:
            x = ragged.unpack(x)
        if logits_at is None:
            scored = x
        else:
            scored = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        logits = self.lm_head(self.norm(scored))
        return x, self.vocab_map.logits_to_target(logits) if self.vocab_map else logits


def aux_hidden_indices(cfg: dict, num_target_layers: int, options: dict | None = None) -> tuple[int, ...]:
    """HF hidden_states indices the head's fc reads (see the module docstring)."""
    options = options or {}
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if options.get("aux_hidden_indices"):
        idx = [int(i) for i in options["aux_hidden_indices"]]
    elif cfg.get("eagle_aux_hidden_state_layer_ids"):
        idx = [int(i) for i in cfg["eagle_aux_hidden_state_layer_ids"]]
    elif nested:
        idx = [int(i) + 1 for i in nested]
    else:
        n = num_target_layers
        idx = [2, n // 2, n - 3]
    bad = [i for i in idx if not 0 <= i <= num_target_layers]
    if bad:
        raise CheckpointError(f"EAGLE-3 aux hidden state index {bad[0]} is outside the target's "
                              f"hidden_states 0..{num_target_layers} (set eagle_aux_hidden_state_layer_ids)")
    return tuple(idx)


def read_eagle3_checkpoint(path: str, target: TargetInfo | None = None,
                           options: dict | None = None) -> tuple[dict, dict]:
    """Normalised state dict (SpecForge key names: midlayer.*, fc, norm, lm_head, embed_tokens,
    d2t, t2d) and config of an EAGLE-3 head (SafeAILab, SpecForge export or training folder,
    speculators).  `d2t` is absent only when the draft vocabulary equals the target's."""
    cfg = native_config(read_config(path), path)  # a speculators config becomes SpecForge's
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in EAGLE3_ARCHITECTURES and not arch.endswith("Eagle3"):
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: unknown EAGLE-3 architecture "
                              f"{arch!r} (expected one of {', '.join(EAGLE3_ARCHITECTURES)})")
    state = {k.replace("layers.0.", "midlayer.", 1) if k.startswith("layers.0.") else k: v
             for k, v in strip_prefixes(load_state_dict(path)).items()}
    state.update({k: v for k, v in _vocab_mapping_beside(path, options).items() if k not in state})
    target_vocab = target.vocab_size if target else int(cfg["vocab_size"])
    draft_vocab = int(cfg.get("draft_vocab_size") or cfg["vocab_size"])
    if "d2t" not in state and draft_vocab != target_vocab:
        raise CheckpointError(
            f"{where(path)}: no d2t but the draft vocabulary ({draft_vocab}) differs from the "
            f"target's ({target_vocab}); add d2t to the weights or a vocab_mapping.pt beside them")
    n_layers = target.num_layers if target else int(cfg.get("num_target_layers", 0) or 0)
    n_aux = len(aux_hidden_indices(cfg, n_layers, options)) if n_layers else 3
    check_keys(state, expected_eagle3_keys(cfg, state, target, n_aux, draft_vocab, target_vocab),
               where(path), optional={"embed_tokens.weight", "d2t", "t2d"})
    return state, cfg


def expected_eagle3_keys(cfg: dict, state: dict, target: TargetInfo | None, n_aux: int,
                         draft_vocab: int, target_vocab: int) -> dict[str, tuple]:
    attn_bias = "midlayer.self_attn.q_proj.bias" in state or bool(cfg.get("attention_bias"))
    shape = LayerShape.from_config(cfg, attn_bias=attn_bias)
    h = shape.hidden
    h_t = int(cfg.get("target_hidden_size") or h)
    if target is not None and target.hidden_size != h_t:
        raise CheckpointError(f"EAGLE-3 head expects target hidden size {h_t}, the target has "
                              f"{target.hidden_size}")
    emb = state.get("embed_tokens.weight")
    emb_size = emb.shape[1] if emb is not None else h_t
    keys = {"fc.weight": (h, n_aux * h_t), "norm.weight": (h,), "lm_head.weight": (draft_vocab, h),
            "embed_tokens.weight": (int(cfg["vocab_size"]), emb_size), "d2t": (draft_vocab,),
            "t2d": (target_vocab,)}
    keys.update(layer_keys("midlayer.", shape, emb_size + h, input_norm=True, hidden_norm=True))
    keys["midlayer.input_layernorm.weight"] = (emb_size,)
    return keys


def _vocab_mapping_beside(path: str, options: dict | None) -> dict:
    """SpecForge keeps {'d2t', 't2d'} in a .pt file next to training checkpoints."""
    explicit = (options or {}).get("vocab_mapping")
    files = [explicit] if explicit else sorted(glob.glob(os.path.join(path, "*vocab_mapping*.pt")))
    for f in files:
        try:
            mapping = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file of many kinds: name it
            raise CheckpointError(f"{f}: cannot read vocab mapping ({type(e).__name__})") from e
        if not isinstance(mapping, dict) or "d2t" not in mapping:
            raise CheckpointError(f"{f}: expected a dict with 'd2t' (and 't2d')")
        return {k: torch.as_tensor(v) for k, v in mapping.items() if k in ("d2t", "t2d")}
    return {}


def _norm_before_residual(cfg: dict) -> bool:
    # vLLM reads a missing flag as False for HF-style configs and True for speculators ones
    return bool(cfg.get("norm_before_residual", "speculators_model_type" in cfg))


def load_eagle3(path: str, target: TargetInfo, options: dict | None = None) -> EagleDrafter:
    options = options or {}
    state, cfg = read_eagle3_checkpoint(path, target, options)
    aux = aux_hidden_indices(cfg, target.num_layers, options)
    vocab_map = VocabMap(state["d2t"].to(target.device), target.vocab_size) if "d2t" in state else None
    if vocab_map is not None and bool((state["d2t"] == 0).all()) and \
            state["d2t"].shape[0] == target.vocab_size:
        vocab_map = None  # identity
    emb_size = state["embed_tokens.weight"].shape[1] if "embed_tokens.weight" in state else target.hidden_size
    head = Eagle3Head(cfg, state["fc.weight"].shape[1], emb_size,
                      "midlayer.self_attn.q_proj.bias" in state, state["lm_head.weight"].shape[0],
                      vocab_map, _norm_before_residual(cfg))
    head.embed = _embedding(state, target, path)
    weights = {k: v for k, v in state.items() if k not in ("embed_tokens.weight", "d2t", "t2d")}
    head.load_state_dict(weights, strict=False)
    _check_loaded(head, weights, path)
    head.to(device=target.device, dtype=target.dtype)  # beside the target, in its dtype
    return EagleDrafter(head, aux, TreeSettings.from_options(options),
                        float(options.get("min_confidence", 0.0)))


FAMILY = Family("eagle3", needs_weights=True, reads_hidden_states=True,
                 architectures=("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM"),
                 speculators_type="eagle3", vllm_method="eagle3", sglang_algorithm="EAGLE3",
                 sglang_plugin_name="SPECPLUG_EAGLE3")


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> EagleDrafter:
    if not spec.path:
        raise ValueError("method 'eagle3' needs --drafter PATH (an EAGLE-3 head folder)")
    return load_eagle3(spec.path, target, spec.options)
