"""Writers: (DraftSpec, canonical state) -> the config and state dict of a target layout.

Targets:
  speculators  what vLLM loads natively.  EAGLE-3 and DFlash get a speculators config
               (`speculators_model_type`, `transformer_layer_config`, `speculators_config`);
               vLLM 0.32 has no speculators type for EAGLE-1, so EAGLE-1 gets vLLM's own EAGLE
               layout (config `LlamaForCausalLM`, renamed EagleLlamaForCausalLM by method "eagle");
               its fc has no bias, so a nonzero fc.bias arrives folded into layer 0's q/k/v/o
               biases (fold.py, config attention_bias + qkv_bias).  EAGLE-3 aux layers go in the
               top-level `eagle_aux_hidden_state_layer_ids` as hidden_states indices.
  sglang       LlamaForCausalLMEagle / Qwen2ForCausalLMEagle, LlamaForCausalLMEagle3,
               DFlashDraftModel.  SGLang skips keys it does not expect and keeps random init for
               parameters it does not get, so prefixes are gone, embeddings (always the
               target's in SGLang) are dropped and a missing EAGLE-1 fc bias is written as zeros.
               EAGLE-3 aux layers go in `eagle_config.eagle_aux_hidden_state_layer_ids` as
               hidden_states index - 1 (SGLang captures id + 1); the specplug layout does the same.
  specplug     the layouts specplug's drafters load natively: SafeAILab EAGLE-1 (`fc`,
               `layers.i`), SafeAILab/SpecForge EAGLE-3 (`midlayer.`, d2t/t2d), z-lab DFlash.
No target needs a transpose (all store Linear weights as [out, in]); each writer lists its renames,
drops and fills explicitly.
"""
from __future__ import annotations

import torch

from .spec import ConvertError, DraftSpec, canonical_shapes

TARGETS = ("speculators", "sglang", "specplug")
SPECULATORS_VERSION = "0.3.0"
DEFAULT_SPEC_TOKENS = 3


def layer_config(spec: DraftSpec, architectures: list[str]) -> dict:
    """The HF decoder config of the drafter (LlamaConfig/Qwen2Config/Qwen3Config fields)."""
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[spec.arch]
    cfg = {
        "architectures": architectures, "model_type": model_type, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "vocab_size": spec.vocab_size, "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling,
        "rope_parameters": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta},
        "max_position_embeddings": spec.max_position_embeddings, "hidden_act": spec.hidden_act,
        # attention_bias: vLLM's o_proj bias, set only by a folded EAGLE-1 fc bias (fold.py)
        "tie_word_embeddings": False, "attention_bias": spec.attn_o_bias, "mlp_bias": False,
    }
    if spec.torch_dtype:
        cfg["torch_dtype"] = spec.torch_dtype
    if spec.arch == "qwen2" or spec.attn_o_bias:
        cfg["qkv_bias"] = True  # vLLM's Llama layer: q/k/v biases (o_proj's follow attention_bias)
    cfg.update(spec.extra)
    return cfg


def _verifier_block(spec: DraftSpec, verifier_cfg: dict | None) -> dict:
    return {"name_or_path": spec.verifier,
            "architectures": list((verifier_cfg or {}).get("architectures") or [])}


def _speculators_config(spec: DraftSpec, algorithm: str, tokens: int, verifier_cfg) -> dict:
    return {"algorithm": algorithm,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy", "verifier": _verifier_block(spec, verifier_cfg)}


def _rename(state: dict, key_map: dict[str, str]) -> dict:
    missing = [k for k in key_map if k not in state]
    if missing:  # a writer table out of step with the canonical table is a bug here, not bad input
        raise AssertionError(f"writer key map names {missing[0]}, absent from the canonical state")
    out = {key_map[k]: v for k, v in state.items() if k in key_map}
    assert len(out) == len(key_map), "writer key map is not one-to-one"
    return out


def _eagle1_fc_bias(spec: DraftSpec, state: dict, engine: str, has_bias: bool) -> dict:
    """vLLM's EAGLE fc has no bias, SGLang's always has one: fill or drop it when that is exact."""
    if has_bias and "fc.bias" not in state:
        return {**state, "fc.bias": torch.zeros(spec.hidden_size, dtype=state["fc.weight"].dtype)}
    if not has_bias and "fc.bias" in state:
        if bool(state["fc.bias"].any()):  # convert() folds it first (fold.py)
            raise ConvertError(f"{engine}'s EAGLE-1 head has no fc bias, and fc.bias is nonzero: "
                               "fold it into layer 0 (converters.fold) or use --to sglang or specplug")
        return {k: v for k, v in state.items() if k != "fc.bias"}
    return state


def _refuse_o_bias(spec: DraftSpec, engine: str) -> None:
    if spec.attn_o_bias:  # a vLLM layout with a folded fc bias, read back as a source
        raise ConvertError(f"{engine}'s EAGLE-1 head has no o_proj bias: layers.0.self_attn.o_proj.bias "
                           "(an fc bias folded in for vLLM) cannot be written; convert the original head")


def midlayer_map(keys) -> dict[str, str]:
    return {k: ("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k) for k in keys}


def plan_target(spec: DraftSpec, state: dict, to_format: str, verifier_cfg: dict | None = None,
                verifier_state: dict | None = None) -> tuple[dict, dict]:
    """-> (config.json dict, state dict in the target's key names)."""
    fam = spec.family
    if to_format == "speculators":
        return _speculators(spec, state, verifier_cfg, verifier_state)
    if to_format == "sglang":
        return _sglang(spec, state)
    if to_format == "specplug":
        if fam == "eagle":
            _refuse_o_bias(spec, "specplug")
            arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[spec.arch]
            return layer_config(spec, [arch]), _rename(state, {k: k for k in state})
        if fam == "eagle3":
            return _eagle3_native_config(spec, "LlamaForCausalLMEagle3"), _rename(state, midlayer_map(state))
        return _dflash_native_config(spec), _rename(state, {k: k for k in state})
    raise ConvertError(f"unknown target format {to_format!r}; known: {', '.join(TARGETS)}")


def _speculators(spec, state, verifier_cfg, verifier_state):
    if spec.family == "eagle":
        if spec.arch == "qwen3":
            raise ConvertError("vLLM has no EAGLE-1 head with Qwen3 layers (q_norm/k_norm): use --to specplug")
        state = _eagle1_fc_bias(spec, state, "vLLM", has_bias=False)
        return layer_config(spec, ["LlamaForCausalLM"]), _rename(state, {k: k for k in state})
    if spec.family == "eagle3":
        cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
               "speculators_version": SPECULATORS_VERSION,
               "transformer_layer_config": layer_config(spec, ["LlamaForCausalLM"]),
               "draft_vocab_size": spec.draft_vocab_size,
               # vLLM defaults this to True when absent, SafeAILab/SpecForge heads need False
               "norm_before_residual": spec.norm_before_residual,
               "target_hidden_size": spec.target_hidden,
               "speculators_config": _speculators_config(spec, "eagle3", DEFAULT_SPEC_TOKENS, verifier_cfg)}
        if spec.aux_layer_ids:  # vLLM reads the top-level key as hidden_states indices
            if len(set(spec.aux_layer_ids)) != len(spec.aux_layer_ids):
                raise ConvertError(f"aux layer ids {spec.aux_layer_ids} repeat a layer: vLLM "
                                   "de-duplicates them and would size fc wrongly")
            cfg["eagle_aux_hidden_state_layer_ids"] = list(spec.aux_layer_ids)
        # vLLM sizes fc from this key (else eagle_config's list, else 3), never the top-level ids
        cfg["transformer_layer_config"]["num_aux_hidden_states"] = (
            state["fc.weight"].shape[1] // spec.target_hidden)
        if spec.torch_dtype:
            cfg["torch_dtype"] = spec.torch_dtype
        # d2t stays int64 offsets and t2d bool: vLLM adds arange(draft_vocab) to d2t
        return cfg, _rename(state, {k: k for k in state})
    # DFlash: z-lab reads hidden_states[id + 1]; speculators/vLLM name that layer id + 1
    if spec.mask_token_id is None:
        raise ConvertError("DFlash config has no mask_token_id, which the speculators format requires")
    if spec.arch != "qwen3":
        raise ConvertError("vLLM's DFlash model has Qwen3 layers (q_norm/k_norm); this checkpoint has none")
    cfg = {"architectures": ["DFlashSpeculator"], "speculators_model_type": "dflash",
           "speculators_version": SPECULATORS_VERSION,
           "transformer_layer_config": layer_config(spec, ["Qwen3ForCausalLM"]),
           "draft_vocab_size": spec.vocab_size, "target_hidden_size": spec.target_hidden,
           "mask_token_id": spec.mask_token_id, "block_size": spec.block_size,
           "aux_hidden_state_layer_ids": [i + 1 for i in spec.target_layer_ids],
           "num_target_layers": spec.num_target_layers,
           "speculators_config": _speculators_config(spec, "dflash", spec.block_size - 1, verifier_cfg)}
    out = _rename(state, {k: k for k in state})
    if verifier_state is not None:  # the speculators library reads them; vLLM shares identical ones
        out["embed_tokens.weight"], out["lm_head.weight"] = verifier_state["embed"], verifier_state["lm_head"]
    return cfg, out


def _sglang(spec, state):
    no_embed = {k: v for k, v in state.items() if k != "embed_tokens.weight"}  # SGLang uses the target's
    if spec.family == "eagle":
        if spec.arch == "qwen3":
            raise ConvertError("SGLang has no EAGLE-1 head with Qwen3 layers (q_norm/k_norm): use --to specplug")
        _refuse_o_bias(spec, "SGLang")
        arch = "Qwen2ForCausalLMEagle" if spec.arch == "qwen2" else "LlamaForCausalLMEagle"
        no_embed = _eagle1_fc_bias(spec, no_embed, "SGLang", has_bias=True)
        cfg = layer_config(spec, [arch])
        cfg.pop("qkv_bias", None)  # SGLang's Qwen2 layer has q/k/v biases by model_type
        return cfg, _rename(no_embed, {k: k for k in no_embed})
    if spec.family == "eagle3":
        if spec.norm_before_residual:
            raise ConvertError("SGLang's EAGLE-3 head takes the residual before hidden_norm; "
                               "norm_before_residual=true cannot be written for it")
        if spec.qkv_bias:
            raise ConvertError("SGLang's EAGLE-3 head has no q/k/v biases; layers.0.self_attn.q_proj.bias cannot be written")
        return _eagle3_native_config(spec, "LlamaForCausalLMEagle3"), _rename(no_embed, midlayer_map(no_embed))
    return _dflash_native_config(spec), _rename(state, {k: k for k in state})


def _eagle3_native_config(spec: DraftSpec, arch: str) -> dict:
    cfg = layer_config(spec, [arch])
    cfg.update({"draft_vocab_size": spec.draft_vocab_size, "target_hidden_size": spec.target_hidden,
                "norm_before_residual": spec.norm_before_residual})
    if spec.aux_layer_ids:
        # SpecForge/SGLang name the layer whose output is read: hidden_states index - 1
        # (SGLang captures id + 1); specplug's loader reads it the same way
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in spec.aux_layer_ids]}
    return cfg


def _dflash_native_config(spec: DraftSpec) -> dict:
    cfg = layer_config(spec, ["DFlashDraftModel"])
    cfg["dflash_config"] = {"block_size": spec.block_size, "mask_token_id": spec.mask_token_id,
                            "target_layer_ids": list(spec.target_layer_ids)}
    cfg["block_size"] = spec.block_size  # older readers look at the top level
    if spec.num_target_layers is not None:
        cfg["num_target_layers"] = spec.num_target_layers
    if spec.target_hidden_size:
        cfg["target_hidden_size"] = spec.target_hidden_size
    return cfg


def expected_target_keys(spec: DraftSpec, to_format: str) -> set[str]:
    """The key set a writer must produce (asserted after writing)."""
    keys = set(canonical_shapes(spec))
    if to_format == "sglang" or (to_format == "speculators" and spec.family == "dflash"):
        keys.discard("embed_tokens.weight")
    if spec.family == "eagle":
        if to_format == "sglang":
            keys.add("fc.bias")
        elif to_format == "speculators":
            keys.discard("fc.bias")
    if spec.family == "eagle3" and to_format in ("sglang", "specplug"):
        keys = set(midlayer_map(keys).values())
    return keys
