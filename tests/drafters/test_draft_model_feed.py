"""The draft model's feed: ragged rows are right-aligned so the lm_head runs on each row's last
token only, and its drafts are what the draft model alone would have chosen."""
from __future__ import annotations

import torch

from specplug.drafters.draft_model import DraftModelDrafter
from specplug.models.tiny import build_tiny_llama
from specplug.types import DraftInput


def _greedy_alone(model, context: list[int], gamma: int) -> list[int]:
    """gamma tokens of plain greedy decoding from `context`, no cache: the reference."""
    ids = list(context)
    for _ in range(gamma):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(context):]


@torch.inference_mode()
def test_ragged_rows_draft_as_the_model_alone_with_one_lm_head_column_each():
    model = build_tiny_llama(seed=3)
    drafter = DraftModelDrafter(build_tiny_llama(seed=3), 256)
    widths = []
    head = drafter.model.lm_head
    head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 11, 7)]
    for step in range(3):  # the rows grow by different amounts each step, as after a verify
        inp = DraftInput(row_ids=[0, 1, 2], token_ids=[torch.tensor(c) for c in contexts],
                         num_draft_tokens=4)
        drafts = drafter.propose(inp).tokens.tolist()
        for c, d in zip(contexts, drafts):
            assert d == _greedy_alone(model, c, 4)
        for r, c in enumerate(contexts):  # accept r + step drafts, then a token of our own
            c += drafts[r][:(r + step) % 4] + [(7 * r + step) % 256]
    assert widths and set(widths) == {1}
