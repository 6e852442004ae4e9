"""Classic draft model: a small causal LM drafts gamma tokens autoregressively.

Its KV cache is a SlotCache keyed by request.  Each call crops a row's cache to what is still a
prefix of the committed tokens (row_slots.surviving_prefix: from the newly committed tokens
alone when the engine counts them), feeds the rest, then drafts.  A draft with another
tokenizer sees the context re-tokenised through text and its drafts are mapped back the same way
(deterministic drafts, verified as point masses); a draft whose vocabulary is a superset/subset of
the target's under the same tokenizer is mapped by id.
"""
from __future__ import annotations

import torch

from ..engine.kv import SlotCache
from ..models.attention import use_grouped_attention
from ..models.decoder_stack import decoder_stack_for
from ..sampling import greedy_tokens, probs_from_logits, sample
from ..types import PAD, DraftInput, DraftProposal
from ..vocab import TextBridge, same_tokenizer
from .base import Drafter, DrafterSpec, Family, TargetInfo, register_drafter
from .row_slots import RowSlots, common_prefix, surviving_prefix


class DraftModelDrafter(Drafter):
    def __init__(self, model, target_vocab: int, bridge: TextBridge | None = None):
        self.model = model.eval()
        use_grouped_attention(self.model)  # verify-like blocks without copying the cache
        # its layers through specplug's DecoderLayer where the architecture allows
        self.net = decoder_stack_for(self.model) or self.model
        self.device = model.device  # the target's (build() puts the draft there)
        self.target_vocab = target_vocab
        self.bridge = bridge  # set when the draft's tokenizer differs from the target's
        self.cache = SlotCache(0, self.device)
        self.slots = RowSlots(self.cache)
        self.cached_tokens: dict[int, list[int]] = {}  # what each row's cache holds, in order

    def release(self, row_ids: list[int]) -> None:
        self.slots.drop(row_ids)
        for rid in row_ids:
            self.cached_tokens.pop(rid, None)

    @torch.inference_mode()
    def propose(self, inp: DraftInput) -> DraftProposal:
        gamma, batch = inp.num_draft_tokens, len(inp.row_ids)
        for rid in self.slots.align(inp.row_ids):
            self.cached_tokens[rid] = []
        # 1. roll back to what is still a prefix of the committed tokens, feed what the cache lacks
        bridged = [self.bridge.to_draft(t.tolist()) for t in inp.token_ids] if self.bridge else None
        feeds = []
        for i, (rid, ids) in enumerate(zip(inp.row_ids, inp.token_ids)):
            have = self.cached_tokens[rid]
            if bridged:  # the whole context re-tokenised in the draft's vocabulary: compared whole
                common = common_prefix(have, bridged[i])
                rest = bridged[i][common:]
            else:
                num_new = inp.num_new_committed[i] if inp.num_new_committed else None
                common, rest = surviving_prefix(have, ids, num_new)
            if not rest:  # all cached: re-feed the last committed token for fresh logits
                common -= 1
                rest = have[common:common + 1]
            self.cache.truncate(i, common)
            del have[common:]
            feeds.append(rest)
        logits = self._feed(inp.row_ids, feeds)
        drafts = torch.full((batch, gamma), PAD, dtype=torch.long, device=self.device)
        probs = None
        sampled = not inp.sampling.greedy and self.bridge is None
        if sampled:
            probs = torch.zeros(batch, gamma, self.target_vocab, dtype=torch.float64,
                                device=self.device)
        gens = inp.generators or [None] * batch
        for step in range(gamma):
            if not self.bridge:
                logits = _fit_vocab(logits, self.target_vocab)
            if sampled:
                p = probs_from_logits(logits, inp.sampling)
                probs[:, step] = p
                toks = [sample(p[r], gens[r]) for r in range(batch)]
            else:
                # the host keeps each row's cached tokens (rollback by common prefix)
                toks = greedy_tokens(logits).tolist()
            drafts[:, step] = torch.tensor(toks, device=self.device)
            if step + 1 < gamma:
                logits = self._feed(inp.row_ids, [[t] for t in toks])
        if self.bridge:
            return self._bridge_back(bridged, drafts, gamma)
        return DraftProposal.chain(drafts, probs)

    def _feed(self, row_ids: list[int], feeds: list[list[int]]) -> torch.Tensor:
        """Append ragged token lists per row; return [batch, vocab] logits at each row's last.
        Rows are right-aligned (padding first), so every row's last token sits in the block's
        last column and only that column goes through the lm_head: over the draft's whole
        vocabulary it was most of a small draft's work (SmolLM2's 2-layer draft in vLLM, 24 rows:
        drafting took 5.2 s of a 15 s batch with logits at every fed token, 2.1 s without)."""
        width = max(len(f) for f in feeds)
        ids = torch.full((len(feeds), width), PAD, dtype=torch.long, device="cpu")
        for i, f in enumerate(feeds):
            ids[i, width - len(f):] = torch.tensor(f, dtype=torch.long, device="cpu")
        ids = ids.to(self.device)  # host lists, copied over once
        real = ids != PAD
        # a row's first real input continues its cache; padding slots are never kept
        pad = (~real).sum(1, keepdim=True)
        pos = (self.cache.length[:, None] - pad + torch.arange(width, device=self.device))
        out = self.cache.forward(self.net, ids, pos.clamp(min=0), real, logits_to_keep=1)
        self.cache.commit([list(range(width - len(f), width)) for f in feeds])
        for rid, f in zip(row_ids, feeds):
            self.cached_tokens[rid] += f
        return out.logits[:, -1].float()

    def _bridge_back(self, contexts, drafts, gamma) -> DraftProposal:
        mapped = [self.bridge.to_target(ctx, d.tolist())[:gamma] for ctx, d in zip(contexts, drafts)]
        return DraftProposal.from_rows([(m, list(range(-1, len(m) - 1))) for m in mapped],
                                       self.device)


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Same tokenizer, padded vocabularies: cut the draft's extra ids or give missing ones -inf."""
    if logits.shape[-1] >= vocab:
        return logits[:, :vocab]
    pad = logits.new_full((logits.shape[0], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)



FAMILY = Family("draft", needs_weights=True, reads_hidden_states=False,
                 sglang_plugin_name="SPECPLUG_DRAFT")


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> DraftModelDrafter:
    from ..models.loading import load_causal_lm, load_tokenizer
    if not spec.path:
        raise ValueError("method 'draft' needs --drafter PATH (a HF causal LM folder)")
    model = load_causal_lm(spec.path, dtype=target.dtype).to(target.device)
    bridge = None
    draft_tok = load_tokenizer(spec.path, required=False)
    if draft_tok is not None and target.tokenizer is not None and not same_tokenizer(draft_tok, target.tokenizer):
        bridge = TextBridge(target.tokenizer, draft_tok)
    elif model.config.vocab_size < target.vocab_size and draft_tok is None:
        raise ValueError(
            f"draft vocabulary ({model.config.vocab_size}) is smaller than the target's "
            f"({target.vocab_size}) and {spec.path} has no tokenizer to map it through")
    return DraftModelDrafter(model, target.vocab_size, bridge)
