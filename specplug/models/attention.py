"""Grouped-query attention without copying the cache: an attention function registered with
transformers' AttentionInterface (its upstream hook for custom attention), used by the targets
and draft models specplug runs itself.

transformers' "sdpa" attention keeps keys and values per key/value head only when there is no
mask, or when one token is fed; the embedded engine always passes a mask (rows of a ragged
batch, trees), so every verify step that feeds more than one token a row went through
`repeat_kv`: a copy of each layer's whole cache, once per query head.  Here one token a row
goes to torch's SDPA with `enable_gqa`, and a block of several is packed: a group's query heads
become more queries of their key/value head.  Measured on SmolLM2-135M (CPU, 1 thread, 10 rows
of 300 cached tokens), one forward:
  fp32, 2 tokens a row: 197 ms through "sdpa", 150 ms with `enable_gqa`; 6 a row: 295 / 228 ms
  bf16, one layer's attention alone, 2 tokens a row: 0.72 ms with `enable_gqa` (torch's CPU
        kernel is slow for few queries), 0.42 ms packed; 6 a row 0.82 / 0.57 ms; 1 a row
        0.31 ms with `enable_gqa`, 0.41 packed
That machine was an Intel Xeon with AMX.  On an AMD EPYC (Zen 5: AVX-512 BF16, no AMX; 2
threads, bf16, one layer's attention over 400 cached tokens) `enable_gqa` with one query a row
is the slow one: 6.3 ms against 0.98 ms packed at 32 rows (1.6 / 0.25 ms at 10, 0.19 / 0.04 at
1), so a plain decode step at batch 32 took 209 ms where 2 tokens a row took 94.  One token a
row is packed too: its mask [batch, 1, 1, kv] serves every query of the group as it is.
On other devices, and wherever the shortcut does not apply, transformers' own function runs:
with a mask, CUDA's fast SDPA kernels do not take grouped heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "specplug_sdpa"


def grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs):
    """query [batch, heads, q, head_dim]; key, value [batch, kv_heads, kv, head_dim];
    attention_mask [batch, 1, q, kv] (additive float or bool) or None.
    Returns ([batch, q, heads, head_dim], None), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    plain = (attention_mask is None or query.device.type != "cpu" or dropout
             or key.shape[1] == query.shape[1] or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None or kwargs.get("cache") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = grouped_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """query [batch, heads, q, head_dim]; key, value [batch, kv_heads, kv, head_dim]; mask
    [batch, 1, q, kv] (additive float or bool, True = may attend), or that mask already
    tiled for packed queries (tile_for_groups: [batch, 1, groups * q, kv]) ->
    [batch, heads, q, head_dim].
    Query head h reads key/value head h // (heads / kv_heads), without copying the cache."""
    batch, heads, q, head_dim = query.shape
    groups = heads // key.shape[1]  # query heads per key/value head
    tiled = q > 1 and groups > 1 and mask.shape[2] == groups * q
    if groups == 1 or query.device.type != "cpu" or mask.shape[1] != 1 or (
            mask.shape[2] != q and not tiled):
        if tiled:  # the layout below is the only one a tiled mask fits
            mask = mask[:, :, :q]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=groups > 1)
    # a group's query heads become more queries of its key/value head: [batch, kv_heads,
    # groups * q, head_dim] (head h reads kv head h // groups), each under its token's mask
    packed = query.reshape(batch, key.shape[1], groups * q, head_dim)
    if not tiled:
        mask = tile_for_groups(mask, groups)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q, head_dim)


def tile_for_groups(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """mask [batch, 1, q, kv] -> [batch, 1, groups * q, kv], the mask of grouped_attention's
    packed queries (one copy per group of query heads; one token a row needs none).  A stack of
    layers attending under one mask tiles it once (models/decoder_stack.py): made in every layer,
    the copies took 127 us of a SmolLM2 verify step on the EPYC under torch.profiler (25 calls),
    10 us made once."""
    return mask if mask.shape[2] == 1 or groups == 1 else mask.repeat(1, 1, groups, 1)


def use_grouped_attention(model) -> None:
    """Switch `model` (an HF model loaded with "sdpa") to grouped_sdpa; any other attention
    implementation (eager, flash, a user's own) is left as it is."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(NAME, grouped_sdpa)
    # the masks transformers builds for this name are the ones it builds for sdpa
    AttentionMaskInterface.register(NAME, AttentionMaskInterface()["sdpa"])
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError) as e:  # a model class that takes no custom attention
        import logging
        logging.getLogger("specplug").info("keeping sdpa attention for %s: %s",
                                           type(model).__name__, e)
