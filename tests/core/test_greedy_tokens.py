"""greedy_tokens is argmax: the first maximal index, ties included, in every dtype."""
import pytest
import torch

from specplug.sampling import greedy_tokens


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_greedy_tokens_is_argmax_ties_included(dtype):
    tied = torch.tensor([[0.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]],
                        dtype=dtype)
    assert greedy_tokens(tied).tolist() == [1, 0, 3]
    few_values = torch.randint(0, 3, (7, 5, 300), generator=torch.Generator().manual_seed(0))
    x = few_values.to(dtype)  # many ties in every row
    assert torch.equal(greedy_tokens(x), x.argmax(-1))
