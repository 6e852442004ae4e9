"""Checkpoint converters: trained drafters into what vLLM, SGLang and specplug load.

    from specplug.converters import convert
    convert("eagle3-ckpt", "out", from_format="auto", to_format="speculators", verifier="target")
"""
from .spec import ConvertError, DraftSpec


def convert(*args, **kwargs):
    from .convert import convert as _convert
    return _convert(*args, **kwargs)


__all__ = ["convert", "ConvertError", "DraftSpec"]
