"""A serving engine's embedding and lm_head, lent to a drafter as plain torch modules.

Engines keep these as tensor-parallel layers (vLLM's VocabParallelEmbedding / ParallelLMHead,
SGLang's of the same names) that pad their rows to a multiple of 64, may shard them, and in the
lm_head's case refuse to be called.  At tensor-parallel size 1 the first `vocab_size` rows of the
weight are exactly the model's, so a lookup / matmul over that slice is what HF would compute.
The weight is shared, never copied: the drafter sits beside the target on its device.
"""
from __future__ import annotations

from torch import nn


class LentEmbedding(nn.Module):
    def __init__(self, weight, vocab_size: int):  # weight [padded_vocab, H]
        super().__init__()
        self.weight = weight[:vocab_size]
        self.num_embeddings = vocab_size

    def forward(self, ids):  # ids [...] -> [..., H]
        return nn.functional.embedding(ids, self.weight)


class LentLmHead(nn.Module):
    def __init__(self, weight, vocab_size: int):  # weight [padded_vocab, H]
        super().__init__()
        self.weight = weight[:vocab_size]

    def forward(self, hidden):  # [..., H] -> [..., vocab]
        return nn.functional.linear(hidden, self.weight)


def lend_modules(info, embed, lm_head, vocab_size: int):
    """Fill TargetInfo.embed_tokens / lm_head from an engine's layers (either may be None)."""
    if embed is not None and getattr(embed, "weight", None) is not None:
        info.embed_tokens = LentEmbedding(embed.weight, vocab_size)
    if lm_head is not None and getattr(lm_head, "weight", None) is not None:
        info.lm_head = LentLmHead(lm_head.weight, vocab_size)
    return info
