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


def resolve_method(method: str | None, drafter: str | None) -> str:
    """No method given: `--drafter ngram` means n-gram lookup, a drafter folder means its family
    (from its config), no drafter means the plain target.  Method "none" is always plain."""
    if method:
        return method
    if not drafter:
        return "none"
    if drafter == "ngram":
        return "ngram"
    return detect_method(drafter)
