"""`convert(src, dst, from_format, to_format, ...)`: read, check, map, write atomically, validate."""
from __future__ import annotations

import json
import os
import shutil

import torch
from dataclasses import dataclass, field

from specplug.checkpoint_io import (DEFAULT_SHARD_BYTES, CheckpointError, StagedFolder, load_state_dict,
                                    read_config, save_state_dict)

from .fold import fold_fc_bias, needs_fold
from .sources import SOURCES, detect_source, latest_training_folder, read_source
from .spec import ConvertError, DraftSpec
from .targets import TARGETS, expected_target_keys, plan_target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


@dataclass
class ConvertResult:
    dst: str
    from_format: str
    to_format: str
    family: str
    num_tensors: int
    num_bytes: int
    files: list[str] = field(default_factory=list)
    max_abs_logit_diff: float | None = None  # set by --validate (0.0 when exact)
    folded_fc_bias: bool = False  # EAGLE-1 fc bias folded into layer 0 for vLLM (fold.py)


def convert(src: str, dst: str, from_format: str = "auto", to_format: str = "speculators",
            verifier: str | None = None, draft_vocab_map: str | None = None, validate: bool = False,
            force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ConvertResult:
    if to_format not in TARGETS:
        raise ConvertError(f"unknown target format {to_format!r}; known: {', '.join(TARGETS)}")
    if from_format not in SOURCES + ("auto",):
        raise ConvertError(f"unknown source format {from_format!r}; known: {', '.join(SOURCES)}, auto")
    if not os.path.isdir(src):
        raise ConvertError(f"source folder not found: {src}")
    if os.path.exists(dst) and not force:  # refuse before reading anything
        raise ConvertError(f"{dst} already exists (pass --force to replace it)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConvertError("SRC and DST are the same folder")
    if from_format == "auto":
        from_format = detect_source(src)
    verifier_cfg = _read_verifier(verifier)
    hints = {"verifier": os.path.abspath(verifier) if verifier else None, "draft_vocab_map": draft_vocab_map}
    spec, state = read_source(src, from_format, hints)
    if verifier_cfg is not None:
        check_verifier(spec, verifier_cfg, verifier)
    verifier_state = None
    if verifier and to_format == "speculators" and spec.family == "dflash":
        verifier_state = verifier_head(verifier, spec)
    if verifier and to_format == "sglang" and "embed_tokens.weight" in state:
        # SGLang always runs the head on the target's embedding: it must be the same tensor
        target_embed = verifier_head(verifier, spec)["embed"]
        if not torch.equal(target_embed.to(state["embed_tokens.weight"].dtype), state["embed_tokens.weight"]):
            raise ConvertError(f"embed_tokens.weight differs from {verifier}'s embedding, and SGLang uses the "
                               "target's: the converted drafter would draft differently (use --to speculators or specplug)")
    written_spec, written_state = spec, state
    if to_format == "speculators" and needs_fold(spec, state):  # vLLM's EAGLE-1 fc has no bias
        written_spec, written_state = fold_fc_bias(spec, state)
    try:
        config, out_state = plan_target(written_spec, written_state, to_format, verifier_cfg, verifier_state)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    expected = expected_target_keys(written_spec, to_format) | ({"embed_tokens.weight", "lm_head.weight"} if verifier_state else set())
    assert set(out_state) == expected, f"writer produced {sorted(set(out_state) ^ expected)[:3]} unexpectedly"
    result = ConvertResult(dst, from_format, to_format, spec.family, len(out_state),
                           sum(t.numel() * t.element_size() for t in out_state.values()),
                           folded_fc_bias=written_state is not state)
    try:
        with StagedFolder(dst, overwrite=force) as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            result.files = ["config.json"] + save_state_dict(out_state, tmp, max_shard_bytes)
            result.files += _copy_tokenizer(src, verifier, tmp)
            if validate:  # on the staged copy: a failed validation leaves nothing behind
                from .validate import validate_conversion
                result.max_abs_logit_diff = validate_conversion(spec, state, tmp, to_format, hints,
                                                                written=(written_spec, written_state))
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    return result


def _read_verifier(verifier: str | None) -> dict | None:
    if verifier is None:
        return None
    try:
        cfg = read_config(verifier)
    except CheckpointError as e:
        raise ConvertError(f"verifier: {e}") from e
    return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg


def check_verifier(spec: DraftSpec, cfg: dict, path: str) -> None:
    """The drafter must fit the target it will run with: hidden size, vocabulary, layer ids."""
    hidden, vocab, layers = cfg.get("hidden_size"), cfg.get("vocab_size"), cfg.get("num_hidden_layers")
    want_hidden = spec.hidden_size if spec.family == "eagle" else spec.target_hidden
    if hidden is not None and hidden != want_hidden:
        raise ConvertError(f"mismatched verifier hidden size: the drafter takes {want_hidden}, "
                           f"{path} has hidden_size {hidden}")
    if vocab is not None and vocab != spec.vocab_size:
        raise ConvertError(f"mismatched verifier vocabulary: the drafter has {spec.vocab_size}, "
                           f"{path} has vocab_size {vocab}")
    if layers is not None:
        ids = spec.target_layer_ids if spec.family == "dflash" else spec.aux_layer_ids
        limit = layers - 1 if spec.family == "dflash" else layers  # EAGLE-3 ids index hidden_states
        if ids and (max(ids) > limit or min(ids) < 0):
            raise ConvertError(f"drafter reads target layer {max(ids)}, but {path} has {layers} layers")
        if spec.family == "dflash" and spec.num_target_layers not in (None, layers):
            raise ConvertError(f"drafter was trained on {spec.num_target_layers} target layers, {path} has {layers}")


def verifier_head(verifier: str, spec: DraftSpec) -> dict:
    """The target's embedding and lm_head (tied models: the embedding twice)."""
    try:
        state = load_state_dict(verifier)
    except CheckpointError as e:
        raise ConvertError(f"verifier: {e}") from e
    embed = next((state[k] for k in ("model.embed_tokens.weight", "embed_tokens.weight") if k in state), None)
    if embed is None:
        raise ConvertError(f"{verifier}: missing key model.embed_tokens.weight")
    head = state.get("lm_head.weight")
    if head is None or head.data_ptr() == embed.data_ptr():
        head = embed.clone()  # tied: safetensors refuses two names for one storage
    if tuple(embed.shape) != (spec.vocab_size, spec.hidden_size):
        raise ConvertError(f"{verifier}: model.embed_tokens.weight has shape {tuple(embed.shape)}, "
                           f"expected {(spec.vocab_size, spec.hidden_size)}")
    return {"embed": embed, "lm_head": head}


def _copy_tokenizer(src: str, verifier: str | None, tmp: str) -> list[str]:
    """Tokenizer files travel with the drafter: from the source, else from the verifier."""
    folders = [src]
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        try:
            folders.insert(0, latest_training_folder(src))
        except ConvertError:
            pass
    if verifier:
        folders.append(verifier)
    for folder in folders:
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
        if names:
            for n in names:
                shutil.copyfile(os.path.join(folder, n), os.path.join(tmp, n))
            return names
    return []
