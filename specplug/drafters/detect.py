"""Which drafter family a checkpoint folder holds, from its config."""
from __future__ import annotations

from ..checkpoint_io import read_config
from .base import families
from .speculators_format import is_speculators, speculators_method


def detect_method(path: str) -> str:
    cfg = read_config(path)
    if "dflash_config" in cfg:
        return "dflash"
    if is_speculators(cfg):
        return speculators_method(cfg, path)
    by_architecture = {arch: f.method for f in families() for arch in f.architectures}
    for arch in cfg.get("architectures") or []:
        if arch in by_architecture:
            return by_architecture[arch]
    if cfg.get("specplug_method"):
        return cfg["specplug_method"]
    if cfg.get("mask_token_id") is not None and cfg.get("model_type") in ("Dream", "dream", "llada"):
        return "specdiff"
    return "draft"  # any other HF causal LM is a classic draft model
