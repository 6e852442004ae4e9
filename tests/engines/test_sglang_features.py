"""integrations/sglang/target_features.py without SGLang: which columns of SGLang's packed
capture feed the drafter, and how each request's features are filed by position and handed over
exactly once."""
from __future__ import annotations

import pytest
import torch

from specplug.integrations.sglang.target_features import FeatureTap


class Model:
    """Records the layer ids it is asked to capture, as SGLang's Llama does."""
    def __init__(self):
        self.asked = None

    def set_eagle3_layers_to_capture(self, layer_ids):
        self.asked = layer_ids


def packed(tokens: int, blocks: list[float], h: int = 2) -> torch.Tensor:
    """[tokens, len(blocks) * h]: block b filled with blocks[b] + token index."""
    return torch.cat([torch.full((tokens, h), v) + torch.arange(tokens)[:, None] for v in blocks], 1)


def test_aux_layers_are_asked_in_sglangs_numbering_and_columns_follow_the_drafter():
    model = Model()
    tap = FeatureTap(model, num_layers=4, hf_indices=(3, 1, 3))
    tap.install(type("Runner", (), {"decode_cuda_graph_runner": None})())  # no graphs to redo
    assert model.asked == [0, 2]  # SGLang's id k captures at layer k + 1, HF's index k + 1
    got = tap.select(packed(2, [10.0, 30.0]))  # SGLang packs layers in order: 1 then 3
    assert got.tolist() == [[30, 30, 10, 10, 30, 30], [31, 31, 11, 11, 31, 31]]


def test_final_hidden_state_needs_no_aux_and_cannot_mix_with_layers():
    model = Model()
    FeatureTap(model, num_layers=4, hf_indices=(-1,)).install(None)
    assert model.asked is None
    with pytest.raises(ValueError, match="either the final hidden state or intermediate"):
        FeatureTap(model, num_layers=4, hf_indices=(2, 4))
    with pytest.raises(ValueError, match="outside the target's 0..4"):
        FeatureTap(model, num_layers=4, hf_indices=(5,))
    with pytest.raises(ValueError, match="cannot capture intermediate"):
        FeatureTap(object(), num_layers=4, hf_indices=(2,))


def test_features_are_handed_over_once_in_position_order():
    tap = FeatureTap(Model(), num_layers=4, hf_indices=(-1,))
    tap.file("a", 0, torch.arange(5.0)[:, None])  # prefill: prompt positions 0..4
    start, feats = tap.take("a", 5)
    assert start == 0 and feats[:, 0].tolist() == [0, 1, 2, 3, 4]
    tap.file("a", 5, torch.tensor([[5.0], [6.0], [7.0]]))  # verify: root + 2 accepted
    tap.file("a", 3, torch.arange(3.0, 9.0)[:, None])  # a re-prefill: known positions skipped
    start, feats = tap.take("a", 8)
    assert start == 5 and feats[:, 0].tolist() == [5, 6, 7]
    start, feats = tap.take("a", 9)  # what was filed past the last take comes next
    assert start == 8 and feats[:, 0].tolist() == [8]
    with pytest.raises(RuntimeError, match=r"positions \[9, 11\) were not computed"):
        tap.take("a", 11)


def test_a_gap_names_the_radix_cache():
    tap = FeatureTap(Model(), num_layers=4, hf_indices=(-1,))
    with pytest.raises(RuntimeError, match="jump from position 0 to 4.*--disable-radix-cache"):
        tap.file("b", 4, torch.zeros(2, 1))
    tap.file("b", 0, torch.zeros(2, 1))
    tap.drop("b")
    with pytest.raises(RuntimeError, match="jump from position 0 to 2"):
        tap.file("b", 2, torch.zeros(1, 1))  # dropped: the request starts afresh
