"""Vocabulary mapping for drafters whose vocabulary differs from the target's.

Two cases:
  * reduced draft vocabulary under the target's tokenizer (EAGLE-3): draft id i is target id
    i + d2t[i] (d2t holds OFFSETS, as SafeAILab/SpecForge/vLLM store it); t2d marks which target
    ids the draft can produce.
  * another tokenizer altogether: re-tokenise through text (TextBridge).
"""
from __future__ import annotations

import torch


class VocabMap:
    def __init__(self, d2t: torch.Tensor, target_vocab: int):
        d2t = d2t.long()
        # [draft_vocab], on d2t's device (drafters move the map with .to(device))
        self.draft_to_target_ids = torch.arange(d2t.shape[0], device=d2t.device) + d2t
        if int(self.draft_to_target_ids.max()) >= target_vocab or int(self.draft_to_target_ids.min()) < 0:
            raise ValueError(f"d2t maps draft ids outside the target vocabulary of {target_vocab}")
        self.target_vocab = target_vocab

    @staticmethod
    def from_t2d(t2d: torch.Tensor) -> "VocabMap":
        """t2d [target_vocab] bool: the draft vocabulary is the marked target ids, in order."""
        ids = t2d.nonzero()[:, 0]
        return VocabMap(ids - torch.arange(ids.shape[0], device=ids.device), t2d.shape[0])

    @property
    def t2d(self) -> torch.Tensor:  # [target_vocab] bool
        mask = torch.zeros(self.target_vocab, dtype=torch.bool, device=self.draft_to_target_ids.device)
        mask[self.draft_to_target_ids] = True
        return mask

    @property
    def d2t(self) -> torch.Tensor:  # [draft_vocab] int64 offsets
        ids = self.draft_to_target_ids
        return ids - torch.arange(ids.shape[0], device=ids.device)

    def to(self, device) -> "VocabMap":
        self.draft_to_target_ids = self.draft_to_target_ids.to(device)
        return self

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_to_target_ids[draft_ids]

    def logits_to_target(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """[..., draft_vocab] -> [..., target_vocab]; ids the draft cannot produce get -inf."""
        out = draft_logits.new_full(draft_logits.shape[:-1] + (self.target_vocab,), float("-inf"))
        out[..., self.draft_to_target_ids] = draft_logits
        return out


def same_tokenizer(a, b) -> bool:
    """Same vocabulary and ids (the draft may have a padded embedding, not another tokenizer)."""
    if a is None or b is None:
        return True
    return a.get_vocab() == b.get_vocab()


class TextBridge:
    """Carry token sequences between two tokenizers through text."""
    def __init__(self, target_tokenizer, draft_tokenizer):
        self.target, self.draft = target_tokenizer, draft_tokenizer

    def to_draft(self, target_ids: list[int]) -> list[int]:
        text = self.target.decode(target_ids, skip_special_tokens=False)
        return self.draft.encode(text, add_special_tokens=False) or [0]

    def to_target(self, context_draft_ids: list[int], draft_ids: list[int]) -> list[int]:
        """Target ids for the draft continuation: encode context+draft text, strip the context.
        Tokens straddling the boundary are dropped, so only clean continuations are proposed."""
        ctx_text = self.draft.decode(context_draft_ids, skip_special_tokens=False)
        full_text = self.draft.decode(context_draft_ids + draft_ids, skip_special_tokens=False)
        if not full_text.startswith(ctx_text):
            return []
        cont = full_text[len(ctx_text):]
        ids = self.target.encode(cont, add_special_tokens=False)
        # the last target token may be cut mid-word by the draft's last token: drop it
        return ids[:-1] if len(ids) > 1 else ids
