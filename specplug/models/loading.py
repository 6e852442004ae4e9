"""Loading HF models and tokenizers from local folders, with errors that name the problem."""
from __future__ import annotations

import os

import torch

from ..drafters.base import TargetInfo


class ModelLoadError(ValueError):
    pass


def _check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path not found: {path}")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path} has no config.json: not a HF model folder")


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    _check_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
    return model.eval()


def load_tokenizer(path: str, required: bool = True):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e
        return None


def target_info(model, tokenizer=None) -> TargetInfo:
    inner = getattr(model, "model", None)
    return TargetInfo(config=model.config, tokenizer=tokenizer,
                      embed_tokens=model.get_input_embeddings(),
                      lm_head=model.get_output_embeddings(),
                      final_norm=getattr(inner, "norm", None), dtype=model.dtype,
                      device=model.device)
