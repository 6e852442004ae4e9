"""specplug's grouped-query attention (specplug/models/attention.py) computes what transformers'
sdpa attention does, and only the models it was meant for are switched to it."""
from __future__ import annotations

import copy

import pytest
import torch

from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.kv import SlotCache
from specplug.models.attention import (NAME, grouped_attention, grouped_sdpa, tile_for_groups,
                                      use_grouped_attention)
from specplug.models.tiny import build_tiny_llama


class _Module:  # what transformers' sdpa reads off the attention module
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("bool_mask", [False, True])
@pytest.mark.parametrize("mask_rows", ["per_query", "shared"])  # [b, 1, q, kv] or [b, 1, 1, kv]
def test_grouped_sdpa_equals_transformers_sdpa(q, bool_mask, mask_rows):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    g = torch.Generator().manual_seed(q)
    query = torch.randn(2, 6, q, 8, generator=g, dtype=torch.float64)
    key, value = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 1, q if mask_rows == "per_query" else 1, 9, generator=g) < 0.7
    allowed[..., 0] = True  # every query sees something
    mask = allowed if bool_mask else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
        ~allowed, torch.finfo(torch.float64).min)
    want, _ = sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.3)
    got, _ = grouped_sdpa(_Module(), query, key, value, mask, scaling=0.3)
    assert got.shape == (2, q, 6, 8)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("q", [1, 4])
def test_a_mask_tiled_once_gives_what_the_mask_gives(q):
    """A stack tiles its mask once for every layer (tile_for_groups); grouped_attention reads
    the tiled mask as the untiled one, on the packed path and (its first q rows) elsewhere."""
    g = torch.Generator().manual_seed(7 + q)
    query = torch.randn(2, 6, q, 8, generator=g, dtype=torch.float64)
    key, value = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 1, q, 9, generator=g) < 0.6
    allowed[..., 0] = True
    tiled = tile_for_groups(allowed, 3)
    assert tiled.shape == (2, 1, 3 * q if q > 1 else 1, 9)
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                                            enable_gqa=True)
    torch.testing.assert_close(grouped_attention(query, key, value, tiled), want)
    torch.testing.assert_close(grouped_attention(query, key, value, allowed), want)
    # a tile in the wrong order (query-major) must not pass for the right one
    if q > 1:
        wrong = allowed.repeat_interleave(3, dim=2)
        assert not torch.allclose(grouped_attention(query, key, value, wrong), want)


def test_a_switched_model_gives_the_same_logits_on_a_ragged_block():
    """Two rows of different lengths, then a 3-token block each (a verify step's shape)."""
    model = build_tiny_llama(0)
    switched = copy.deepcopy(model)
    use_grouped_attention(switched)
    assert switched.config._attn_implementation == NAME
    logits = []
    for m in (model, switched):
        cache = SlotCache(2)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
        cache.forward(m, ids, torch.arange(4).expand(2, 4), ids != 0)
        cache.commit([[0, 1, 2, 3], [0, 1]])
        block = torch.tensor([[11, 12, 13], [14, 15, 16]])
        logits.append(cache.forward(m, block, cache.length[:, None] + torch.arange(3),
                                    torch.ones(2, 3, dtype=torch.bool)).logits)
    torch.testing.assert_close(logits[0], logits[1])


def test_only_sdpa_models_are_switched_and_the_engine_switches_its_target():
    eager = build_tiny_llama(0, attn_implementation="eager")
    use_grouped_attention(eager)
    assert eager.config._attn_implementation == "eager"
    model = build_tiny_llama(0)
    EmbeddedEngine(model)
    assert model.config._attn_implementation == NAME
