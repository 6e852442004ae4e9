"""Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n
first) and propose the tokens that followed it.  Deterministic, so verified as point masses."""
from __future__ import annotations

import torch

from ..types import PAD, DraftInput, DraftProposal
from .base import Drafter, DrafterSpec, Family, TargetInfo, register_drafter


def lookup(tokens: torch.Tensor, max_ngram: int, min_ngram: int, num_tokens: int) -> list[int]:
    """tokens [n] -> up to num_tokens continuation tokens of the latest longest n-gram match."""
    n_ctx = tokens.shape[0]
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = tokens[n_ctx - n:]
        windows = tokens[:n_ctx - 1].unfold(0, n, 1)  # [n_ctx - n, n]; excludes the suffix itself
        hits = (windows == suffix).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + num_tokens].tolist()
    return []


class NgramDrafter(Drafter):
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1,
                 device: torch.device | str | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram sizes need 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.device = device  # the target's: proposals go there (None: torch's default)

    def propose(self, inp: DraftInput) -> DraftProposal:
        drafts = [lookup(t, self.max_ngram, self.min_ngram, inp.num_draft_tokens)
                  for t in inp.token_ids]
        # lookups run on the host's committed tokens; the proposal crosses to the device once
        return DraftProposal.from_rows([(d, list(range(-1, len(d) - 1))) for d in drafts],
                                       self.device)


FAMILY = Family("ngram", needs_weights=False, reads_hidden_states=False,
                 vllm_lookup_method="ngram",
                 sglang_plugin_name="SPECPLUG_NGRAM")


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> NgramDrafter:
    return NgramDrafter(int(spec.options.get("max_ngram", 3)), int(spec.options.get("min_ngram", 1)),
                        target.device)
