"""The speculators format (what vLLM loads natively), read into specplug's own drafters.

A speculators folder keeps the drafter's weights under the names vLLM loads (`layers.0.` for
EAGLE-3's single layer, d2t/t2d in the weights, DFlash with copies of the verifier's
`embed_tokens`/`lm_head`) and wraps the decoder's HF config in its own:

  {"speculators_model_type": "eagle3" | "dflash", "speculators_version": ...,
   "transformer_layer_config": {<LlamaConfig / Qwen3Config fields>},
   "speculators_config": {"algorithm", "proposal_methods": [{"speculative_tokens", ...}], ...},
   eagle3: "draft_vocab_size", "target_hidden_size", "norm_before_residual",
           "eagle_aux_hidden_state_layer_ids" (HF hidden_states indices, as vLLM reads them)
   dflash: "mask_token_id", "block_size", "aux_hidden_state_layer_ids" (= z-lab
           target_layer_ids + 1: DFlash reads the OUTPUT of layer id, hidden_states[id + 1])}

`native_config` turns that config into the one eagle3.py / dflash.py read for their native
layouts, so the weights load unchanged.  Only what vLLM itself does with each field is
reproduced (vllm/transformers_utils/configs/speculators/algos.py): a missing
`norm_before_residual` means True; a field that changes the math and that specplug's heads do
not implement is refused by name rather than ignored.
"""
from __future__ import annotations

import os

from ..checkpoint_io import CheckpointError

# EAGLE-3 options vLLM implements and specplug's head does not: refused when true
UNSUPPORTED_EAGLE3_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")


def is_speculators(cfg: dict) -> bool:
    return cfg.get("speculators_model_type") is not None


def speculators_method(cfg: dict, folder: str) -> str:
    """The specplug method that loads a speculators folder."""
    from .base import families  # the families' modules import this one
    kind = cfg.get("speculators_model_type")
    by_type = {f.speculators_type: f.method for f in families() if f.speculators_type}
    if kind not in by_type:
        raise CheckpointError(f"{_where(folder)}: speculators_model_type {kind!r} has no specplug "
                              f"loader (supported: {', '.join(by_type)})")
    return by_type[kind]


def native_config(cfg: dict, folder: str) -> dict:
    """A speculators config -> the native config of its family; any other config unchanged."""
    if not is_speculators(cfg):
        return cfg
    method = speculators_method(cfg, folder)
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict) or not layer.get("hidden_size"):
        raise CheckpointError(f"{_where(folder)}: speculators config has no transformer_layer_config")
    return (_eagle3_config if method == "eagle3" else _dflash_config)(cfg, dict(layer), folder)


def _eagle3_config(cfg: dict, layer: dict, folder: str) -> dict:
    where = _where(folder)
    model_type = layer.get("model_type", "llama")
    if model_type != "llama":  # vLLM's Eagle3Qwen3 head has q_norm/k_norm: not in specplug's
        raise CheckpointError(f"{where}: EAGLE-3 transformer_layer_config model_type {model_type!r} "
                              "is not supported (llama only)")
    for flag in UNSUPPORTED_EAGLE3_FLAGS:
        if cfg.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported by specplug's EAGLE-3 head")
    out = {k: v for k, v in layer.items() if k != "eagle_config"}
    out.update({
        "architectures": ["LlamaForCausalLMEagle3"],
        "draft_vocab_size": cfg.get("draft_vocab_size") or layer.get("vocab_size"),
        # vLLM: absent means True for speculators configs (False for SpecForge ones)
        "norm_before_residual": bool(cfg.get("norm_before_residual", True)),
    })
    if cfg.get("target_hidden_size") is not None:
        out["target_hidden_size"] = cfg["target_hidden_size"]
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    if ids:  # kept top-level: eagle3.aux_hidden_indices reads it as hidden_states indices
        out["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in ids]
    return out


def _dflash_config(cfg: dict, layer: dict, folder: str) -> dict:
    where = _where(folder)
    aux, mask = cfg.get("aux_hidden_state_layer_ids"), cfg.get("mask_token_id")
    if not aux or mask is None:
        raise CheckpointError(f"{where}: DFlash speculators config needs aux_hidden_state_layer_ids "
                              "and mask_token_id")
    draft_vocab = cfg.get("draft_vocab_size")
    if draft_vocab is not None and int(draft_vocab) != int(layer.get("vocab_size", draft_vocab)):
        raise CheckpointError(f"{where}: DFlash draft_vocab_size {draft_vocab} differs from vocab_size "
                              f"{layer.get('vocab_size')}: a reduced draft vocabulary is not supported")
    kinds = set(layer.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise CheckpointError(f"{where}: DFlash layer_types {sorted(kinds)}: only full_attention "
                              "layers are supported")
    block = cfg.get("block_size") or _speculative_tokens(cfg, where) + 1
    out = dict(layer)
    out["architectures"] = ["DFlashDraftModel"]
    # speculators / vLLM name the hidden_states index (id + 1); z-lab names the layer id
    out["dflash_config"] = {"block_size": int(block), "mask_token_id": int(mask),
                            "target_layer_ids": [int(i) - 1 for i in aux]}
    for key in ("num_target_layers", "target_hidden_size"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def _speculative_tokens(cfg: dict, where: str) -> int:
    """Tokens per step of the default proposal method (DFlash block size - 1)."""
    sc = cfg.get("speculators_config") or {}
    methods = sc.get("proposal_methods") or []
    chosen = next((m for m in methods if m.get("proposal_type") == sc.get("default_proposal_method")),
                  methods[0] if methods else {})
    if not chosen.get("speculative_tokens"):
        raise CheckpointError(f"{where}: DFlash speculators config has no block_size and no "
                              "speculators_config.proposal_methods[].speculative_tokens")
    return int(chosen["speculative_tokens"])


def _where(folder: str) -> str:
    return os.path.join(folder, "config.json")
