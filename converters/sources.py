"""Readers: a source checkpoint folder -> (DraftSpec, canonical state dict).

Each reader owns one explicit key table {source key: canonical key} and its explicit drops.
Sources: SafeAILab EAGLE-1/2 (`eagle`), SafeAILab EAGLE-3 (`eagle3`), SpecForge EAGLE-3 training
folders (`specforge`), specforge_het stand-alone drafters (`specforge-het`), z-lab DFlash
(`dflash`).  `read_speculators` reads our own speculators output back (validation, round trips).
"""
from __future__ import annotations

import glob
import json
import os
import re

import torch

from specplug.checkpoint_io import CheckpointError, load_file, load_state_dict, read_config, weight_files

from .keymaps import ROTARY_BUFFER, apply_key_map, check_canonical, normalize_vocab_map, t2d_from_d2t
from .spec import ConvertError, DraftSpec, canonical_shapes

SOURCES = ("eagle", "eagle3", "specforge", "specforge-het", "dflash")
EAGLE1_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "EagleLlamaForCausalLM",
                "LlamaForCausalLMEagle", "Qwen2ForCausalLMEagle")
SPECFORGE_PREFIXES = ("draft_model.", "module.")
VOCAB_MAP_NAMES = ("vocab_mapping.pt", "draft_vocab_map.pt", "d2t_t2d.pt")


# -- config -> spec -------------------------------------------------------------------------
def spec_from_config(cfg: dict, family: str, arch: str, where: str, **fields) -> DraftSpec:
    def need(name):
        if cfg.get(name) is None:
            raise ConvertError(f"{where}: config.json has no {name}")
        return cfg[name]
    H, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return DraftSpec(
        family=family, arch=arch, hidden_size=H, intermediate_size=int(need("intermediate_size")),
        num_layers=int(cfg.get("num_hidden_layers", 1)), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads), vocab_size=int(need("vocab_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        rope_scaling=scaling, max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        hidden_act=cfg.get("hidden_act", "silu"),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"), **fields)


def _arch_from_keys(state: dict, default: str) -> str:
    if any(k.endswith("self_attn.q_norm.weight") for k in state):
        return "qwen3"
    if any(k.endswith("self_attn.q_proj.bias") for k in state):
        return "qwen2"
    return default


def _identity_map(spec: DraftSpec, state: dict) -> dict[str, str]:
    return {k: k for k in canonical_shapes(spec)}


def _finish(spec: DraftSpec, state: dict, key_map: dict, where: str, drops=(ROTARY_BUFFER,),
            optional=frozenset()) -> tuple[DraftSpec, dict]:
    out = apply_key_map(state, key_map, where, drops, optional)
    check_canonical(out, spec, where)
    return spec, out


# -- EAGLE-1/2 (SafeAILab) ------------------------------------------------------------------
def read_eagle(src: str, hints: dict | None = None) -> tuple[DraftSpec, dict]:
    cfg, state = read_config(src), load_state_dict(src)
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if not any(a in EAGLE1_ARCHS for a in archs):
        raise ConvertError(f"{src}: unknown architecture {archs[0]} for an EAGLE-1/2 checkpoint "
                           f"(known: {', '.join(EAGLE1_ARCHS)})")
    by_type = "qwen2" if "qwen2" in str(cfg.get("model_type", "")) else "llama"
    # o_proj biases: vLLM's layout of a folded fc bias (fold.py), whose q/k/v biases say nothing
    # about the architecture
    o_bias = any(k.endswith("self_attn.o_proj.bias") for k in state)
    arch = by_type if o_bias else _arch_from_keys(state, by_type)
    spec = spec_from_config(cfg, "eagle", arch, src, fc_bias="fc.bias" in state,
                            qkv_bias=arch == "qwen2" or o_bias, attn_o_bias=o_bias,
                            has_embed="embed_tokens.weight" in state,
                            verifier=(hints or {}).get("verifier"))
    # SafeAILab layout is the canonical one: identity map, rotary caches dropped
    return _finish(spec, state, _identity_map(spec, state), src)


# -- EAGLE-3 (SafeAILab and SpecForge) ------------------------------------------------------
def eagle3_source_map(spec: DraftSpec, state: dict) -> dict[str, str]:
    """SafeAILab/SpecForge name the single decoder layer `midlayer.`; newer exports say `layers.0.`."""
    uses_midlayer = any(k.startswith("midlayer.") for k in state)
    key_map = {}
    for k in canonical_shapes(spec):
        src = "midlayer." + k[len("layers.0."):] if uses_midlayer and k.startswith("layers.0.") else k
        key_map[src] = k
    return key_map


def read_eagle3(src: str, hints: dict | None = None, specforge: bool = False) -> tuple[DraftSpec, dict]:
    hints = hints or {}
    folder = latest_training_folder(src) if specforge else src
    cfg = read_config(folder)
    state = _specforge_weights(folder) if specforge else load_state_dict(folder)
    if specforge:  # trainer wrappers prefix the draft's keys; SGLang would silently skip them
        state = {_strip_prefix(k): v for k, v in state.items()}
    archs = cfg.get("architectures") or []
    if not any("eagle3" in a.lower() for a in archs) and not any(k.startswith("midlayer.") for k in state):
        raise ConvertError(f"{folder}: unknown architecture {archs[0] if archs else None} "
                           "for an EAGLE-3 checkpoint (expected LlamaForCausalLMEagle3)")
    if int(cfg.get("num_hidden_layers", 1)) != 1:
        raise ConvertError(f"{folder}: EAGLE-3 with {cfg['num_hidden_layers']} layers is not supported (1 layer)")
    aux = eagle3_aux_indices(cfg, folder)
    lm_head = state.get("lm_head.weight")
    draft_vocab = cfg.get("draft_vocab_size") or (lm_head.shape[0] if lm_head is not None else None)
    spec = spec_from_config(
        cfg, "eagle3", "llama", folder, draft_vocab_size=int(draft_vocab or cfg.get("vocab_size", 0)),
        target_hidden_size=cfg.get("target_hidden_size") or _fc_width(state, len(aux) if aux else 3),
        num_aux=len(aux) if aux else 3, aux_layer_ids=list(aux) if aux else None,
        norm_before_residual=bool(cfg.get("norm_before_residual", False)),
        has_embed="embed_tokens.weight" in state, verifier=hints.get("verifier"))
    if any(k.endswith("q_proj.bias") for k in state):
        spec.qkv_bias = True
    state = _attach_vocab_map(state, spec, folder, hints.get("draft_vocab_map"), search_beside=True)
    return _finish(spec, state, eagle3_source_map(spec, state), folder)


def eagle3_aux_indices(cfg: dict, where: str) -> list[int] | None:
    """The aux layers as HF hidden_states indices (canonical, vLLM's convention).  A top-level
    `eagle_aux_hidden_state_layer_ids` (speculators / vLLM) is the index itself; the one in
    `eagle_config` (SpecForge / SGLang) names the layer whose OUTPUT is read: index = id + 1."""
    top = cfg.get("eagle_aux_hidden_state_layer_ids")
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    from_nested = [int(i) + 1 for i in nested] if nested else None
    if top and from_nested and [int(i) for i in top] != from_nested:
        raise ConvertError(f"{where}: eagle_aux_hidden_state_layer_ids {list(top)} and eagle_config."
                           f"eagle_aux_hidden_state_layer_ids {list(nested)} name different target layers "
                           "(the top-level ids are hidden_states indices, eagle_config's are index - 1)")
    return [int(i) for i in top] if top else from_nested


def _fc_width(state: dict, n_inputs: int) -> int | None:
    """The target hidden size an fc [H, n * Ht] implies, when the config does not say it."""
    fc = state.get("fc.weight")
    if fc is None or fc.dim() != 2 or fc.shape[1] % max(n_inputs, 1):
        return None  # the shape check then names fc.weight
    return int(fc.shape[1] // n_inputs)


def _strip_prefix(key: str) -> str:
    for p in SPECFORGE_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def latest_training_folder(src: str) -> str:
    """SpecForge writes epoch_{e}[_step_{s}] folders under its output dir; take the newest."""
    if os.path.isfile(os.path.join(src, "config.json")):
        return src
    found = []
    for path in glob.glob(os.path.join(src, "*")):
        m = re.fullmatch(r"epoch_(\d+)(?:_step_(\d+))?", os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, "config.json")):
            found.append(((int(m.group(1)), int(m.group(2) or 0)), path))
    if not found:
        raise ConvertError(f"{src}: no config.json and no epoch_* training checkpoint folders")
    return max(found)[1]


def _specforge_weights(folder: str) -> dict:
    # a training folder also holds optimizer/training state: read only the model's weights
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return load_state_dict(folder)
    raise ConvertError(f"{folder}: no model.safetensors or pytorch_model.bin in the training folder")


def _attach_vocab_map(state: dict, spec: DraftSpec, folder: str, explicit: str | None,
                      search_beside: bool) -> dict:
    """d2t/t2d from the weights, an explicit --draft-vocab-map file, or a mapping saved beside."""
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    path = explicit
    if path is None and d2t is None and search_beside:
        for base in (folder, os.path.dirname(os.path.abspath(folder))):
            hits = [os.path.join(base, n) for n in VOCAB_MAP_NAMES if os.path.isfile(os.path.join(base, n))]
            if hits:
                path = hits[0]
                break
    if path is not None:
        d2t, t2d = read_vocab_map(path)
    d2t, t2d = normalize_vocab_map(d2t, t2d, path or folder)
    if d2t is None:
        if spec.draft_vocab_size != spec.vocab_size:
            raise ConvertError(
                f"{folder}: missing d2t for a draft vocabulary of {spec.draft_vocab_size} < "
                f"{spec.vocab_size} (pass --draft-vocab-map FILE); without it every draft id maps wrong")
        d2t = torch.zeros(spec.draft_vocab_size, dtype=torch.int64)
    if t2d is None:
        t2d = t2d_from_d2t(d2t, spec.vocab_size) if _in_range(d2t, spec.vocab_size) else torch.zeros(spec.vocab_size, dtype=torch.bool)
    return {**state, "d2t": d2t, "t2d": t2d}


def _in_range(d2t: torch.Tensor, vocab: int) -> bool:
    ids = torch.arange(d2t.shape[0]) + d2t
    return d2t.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab)


def read_vocab_map(path: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A .pt dict {"d2t", "t2d"} (SpecForge's vocab_mapping.pt) or a safetensors file with them."""
    if not os.path.isfile(path):
        raise ConvertError(f"draft vocab map not found: {path}")
    if path.endswith(".safetensors"):
        data = load_file(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"{path}: cannot read the draft vocab map ({type(e).__name__})") from e
    if not isinstance(data, dict) or "d2t" not in data:
        raise ConvertError(f"{path}: missing d2t in the draft vocab map")
    return data["d2t"], data.get("t2d")


# -- specforge_het stand-alone drafters ------------------------------------------------------
HET_DRAFTERS = {"LlamaDrafter": "llama", "Qwen3Drafter": "qwen3"}


def read_specforge_het(src: str, hints: dict | None = None) -> tuple[DraftSpec, dict]:
    """SRC/config.json is the base config plus speculative_decoding_* fields; the drafter lives in
    SRC/draft_model/{config.json,states.pt}.  EagleV2 names the EAGLE fc `eagle_fc`."""
    cfg = read_config(src)
    algo = cfg.get("speculative_decoding_algorithm")
    if algo is None:
        raise ConvertError(f"{src}: config.json has no speculative_decoding_algorithm: not a specforge_het model")
    if algo != "EagleV2":
        raise ConvertError(f"{src}: specforge_het algorithm {algo!r} has no engine layout (only EagleV2)")
    drafter = cfg.get("speculative_decoding_draft_model")
    if drafter not in HET_DRAFTERS:
        raise ConvertError(f"{src}: unknown architecture {drafter} for a specforge_het drafter "
                           f"(known: {', '.join(HET_DRAFTERS)})")
    draft_dir = os.path.join(src, "draft_model")
    draft_cfg = read_config(draft_dir)
    states = os.path.join(draft_dir, "states.pt")
    state = load_file(states) if os.path.isfile(states) else load_state_dict(draft_dir)
    if not cfg.get("skip_first_input_layernorm", True):
        raise ConvertError(f"{src}: skip_first_input_layernorm is false: layer 0 input_layernorm has no EAGLE slot")
    if not cfg.get("skip_output_norm", True):
        raise ConvertError(f"{src}: skip_output_norm is false: norm.weight has no EAGLE-1 slot")
    merged = {**draft_cfg, "hidden_size": cfg.get("hidden_size"), "vocab_size": cfg.get("vocab_size"),
              "num_hidden_layers": cfg.get("draft_layers", draft_cfg.get("num_hidden_layers", 1))}
    arch = HET_DRAFTERS[drafter]
    spec = spec_from_config(merged, "eagle", arch, src, fc_bias=True, qkv_bias=bool(draft_cfg.get("attention_bias")),
                            verifier=(hints or {}).get("verifier") or cfg.get("speculative_decoding_base_model_path"))
    key_map = {k: k for k in canonical_shapes(spec)}
    key_map["eagle_fc.weight"] = key_map.pop("fc.weight")
    key_map["eagle_fc.bias"] = key_map.pop("fc.bias")
    return _finish(spec, state, key_map, states)


# -- DFlash (z-lab) ---------------------------------------------------------------------------
def read_dflash(src: str, hints: dict | None = None) -> tuple[DraftSpec, dict]:
    cfg, state = read_config(src), load_state_dict(src)
    archs = cfg.get("architectures") or []
    if not any(a.startswith("DFlash") for a in archs):
        raise ConvertError(f"{src}: unknown architecture {archs[0] if archs else None} for a DFlash checkpoint "
                           "(expected DFlashDraftModel)")
    dcfg = cfg.get("dflash_config") or {}
    block = dcfg.get("block_size", cfg.get("block_size"))  # older z-lab configs: top level
    layer_ids = dcfg.get("target_layer_ids", cfg.get("target_layer_ids"))
    if block is None or layer_ids is None:
        raise ConvertError(f"{src}: config.json has no dflash_config.{'block_size' if block is None else 'target_layer_ids'}")
    keep = ("layer_types", "sliding_window", "use_sliding_window", "max_window_layers", "attention_bias")
    spec = spec_from_config(
        cfg, "dflash", _arch_from_keys(state, "llama"), src, block_size=int(block),
        mask_token_id=dcfg.get("mask_token_id", cfg.get("mask_token_id")),
        target_layer_ids=[int(i) for i in layer_ids], num_target_layers=cfg.get("num_target_layers"),
        target_hidden_size=cfg.get("target_hidden_size") or _fc_width(state, len(layer_ids)),
        verifier=(hints or {}).get("verifier"), extra={k: cfg[k] for k in keep if k in cfg})
    spec.qkv_bias = spec.arch == "qwen2"
    return _finish(spec, state, _identity_map(spec, state), src)


# -- our own speculators output, read back ------------------------------------------------------
def read_speculators(src: str, hints: dict | None = None) -> tuple[DraftSpec, dict]:
    cfg = read_config(src)
    kind = cfg.get("speculators_model_type")
    if kind is None:  # EAGLE-1 has no speculators type: we wrote vLLM's native EAGLE layout
        return read_eagle(src, hints)
    layer_cfg = dict(cfg.get("transformer_layer_config") or {})
    verifier = ((cfg.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    state = load_state_dict(src)
    if kind == "eagle3":
        spec = spec_from_config(
            layer_cfg, "eagle3", "llama", src, draft_vocab_size=int(cfg["draft_vocab_size"]),
            target_hidden_size=cfg.get("target_hidden_size"), norm_before_residual=bool(cfg["norm_before_residual"]),
            aux_layer_ids=eagle3_aux_indices(cfg, src),
            num_aux=len(eagle3_aux_indices(cfg, src) or [0, 0, 0]),
            has_embed="embed_tokens.weight" in state, verifier=verifier,
            qkv_bias=any(k.endswith("q_proj.bias") for k in state))
        return _finish(spec, state, _identity_map(spec, state), src)
    if kind == "dflash":
        aux = cfg["aux_hidden_state_layer_ids"]
        spec = spec_from_config(
            layer_cfg, "dflash", _arch_from_keys(state, "llama"), src, block_size=int(cfg["block_size"]),
            mask_token_id=cfg.get("mask_token_id"), target_layer_ids=[i - 1 for i in aux],
            num_target_layers=cfg.get("num_target_layers"), target_hidden_size=cfg.get("target_hidden_size"),
            verifier=verifier, extra={k: layer_cfg[k] for k in ("layer_types", "sliding_window", "use_sliding_window",
                                                                   "max_window_layers") if k in layer_cfg})
        # embed_tokens/lm_head are the verifier's copies, written for the speculators library
        drops = (ROTARY_BUFFER, re.compile(r"^(embed_tokens|lm_head)\.weight$"))
        return _finish(spec, state, _identity_map(spec, state), src, drops=drops)
    raise ConvertError(f"{src}: unknown speculators_model_type {kind!r}")


def read_source(src: str, from_format: str, hints: dict | None = None) -> tuple[DraftSpec, dict]:
    try:
        if from_format == "eagle":
            return read_eagle(src, hints)
        if from_format == "eagle3":
            return read_eagle3(src, hints)
        if from_format == "specforge":
            return read_eagle3(src, hints, specforge=True)
        if from_format == "specforge-het":
            return read_specforge_het(src, hints)
        if from_format == "dflash":
            return read_dflash(src, hints)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    raise ConvertError(f"unknown source format {from_format!r}; known: {', '.join(SOURCES)}, auto")


def detect_source(src: str) -> str:
    """Name the source layout from config.json and the weight keys (for --from auto)."""
    if not os.path.isdir(src):
        raise ConvertError(f"source folder not found: {src}")
    if os.path.isdir(os.path.join(src, "draft_model")) and os.path.isfile(os.path.join(src, "config.json")):
        if "speculative_decoding_algorithm" in read_config(src):
            return "specforge-het"
    folder = latest_training_folder(src)
    cfg = read_config(folder)
    if cfg.get("speculators_config") is not None:
        raise ConvertError(f"{src}: already in speculators format")
    archs = cfg.get("architectures") or []
    if any(a.startswith("DFlash") for a in archs) or "dflash_config" in cfg:
        return "dflash"
    keys = _weight_keys(folder)
    if folder != src or any(k.startswith(SPECFORGE_PREFIXES) for k in keys):
        return "specforge"
    if any("eagle3" in a.lower() for a in archs) or any(k.startswith("midlayer.") for k in keys):
        return "eagle3"
    if "fc.weight" in keys and any(a in EAGLE1_ARCHS for a in archs):
        return "eagle"
    raise ConvertError(f"{src}: cannot detect the source layout (architectures {archs}); pass --from")


def _weight_keys(folder: str) -> set[str]:
    try:
        files = weight_files(folder)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    index = [f for f in os.listdir(folder) if f.endswith(".index.json")]
    if index:
        with open(os.path.join(folder, index[0])) as f:
            return set(json.load(f)["weight_map"])
    keys: set[str] = set()
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(path, "pt") as f:
                    keys |= set(f.keys())
            except Exception as e:
                raise ConvertError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:120]})") from e
        else:
            keys |= set(load_file(path))
    return keys
