"""What a custom_class proposer may borrow from vLLM's runner and target model.

vLLM 0.32 builds the proposer with `Cls(vllm_config)` and calls `load_model(target_model)` from
the model runner's own `load_model` (CPUModelRunner / GPUModelRunner: `self.drafter.load_model(
self.model)`); the runner object is not passed, and vLLM offers no other way to reach it.
Drafters that read target features need the runner (its aux-output switch, its forward, its
batch layout: request ids in row order, query_start_loc), so the runner is read once, from the
caller's frame of that call; compat.py checks that the call is still there before the plugin
trusts it.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from specplug.drafters.base import TargetInfo


def runner_calling_load_model(target_model: nn.Module, depth: int = 2):
    """The model runner whose `load_model` called the proposer's `load_model` (depth frames up:
    proposer.load_model -> the runner's load_model).  Raises when it is not one."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    frame = sys._getframe(depth)
    runner = frame.f_locals.get("self")
    if not isinstance(runner, GPUModelRunner) or getattr(runner, "model", None) is not target_model:
        raise RuntimeError(
            "specplug: the custom_class proposer's load_model was not called by vLLM's model "
            f"runner with its target model (caller: {frame.f_code.co_qualname}); drafters that read "
            "target hidden states cannot find the batch layout")
    return runner


def check_runner_settings(vllm_config) -> None:
    """Settings a hidden-state drafter needs; one clear error each.  (Compile and graph modes
    stay as vLLM chose: features come out as the target's own forward outputs.)"""
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("specplug drafters that read target hidden states need "
                         "enable_prefix_caching=False: a cached prefix is never run through the "
                         "target, so its hidden states do not exist")


def target_info_from(model_config, target_model: nn.Module | None = None) -> TargetInfo:
    """What a drafter may borrow from vLLM's target: its HF config and tokenizer, and once the
    model is loaded its embedding and lm_head (EAGLE / DFlash heads share them)."""
    from specplug.models.loading import load_tokenizer
    tokenizer = load_tokenizer(model_config.tokenizer, required=False)
    info = TargetInfo(config=model_config.hf_text_config, tokenizer=tokenizer,
                      dtype=model_config.dtype, device=_device_of(target_model))
    if target_model is None:
        return info
    from .target_features import decoder_parts
    from specplug.models.lent import lend_modules
    embed, _, _ = decoder_parts(target_model)
    return lend_modules(info, embed, getattr(target_model, "lm_head", None),
                        int(model_config.hf_text_config.vocab_size))


def _device_of(target_model: nn.Module | None) -> torch.device:
    """Where vLLM put the target's weights (the drafter goes beside them); the CPU before the
    target is loaded, where only token-only drafters are built (and vLLM's CPU build runs)."""
    if target_model is not None:
        for p in target_model.parameters():
            return p.device
    return torch.device("cpu")
