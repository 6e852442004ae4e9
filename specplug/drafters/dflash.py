"""DFlash (z-lab): a block-diffusion head drafts a whole block in one non-causal pass.

Per step, for a row whose committed tokens end in `last` at position N - 1:
  block  = [last, MASK, MASK, ..., MASK]            (block_len = min(gamma, block_size - 1) + 1)
  query  = the target's embedding of the block, at positions N - 1 ... N - 2 + block_len
  keys   = [context K/V, block K/V]; every block position sees every key (no causal mask)
  drafts = argmax / sample of target_lm_head(norm(output)) at block positions 1 ...
Context K/V come from the target's hidden states: feats = cat(hidden_states[id + 1] for id in
target_layer_ids), ctx = hidden_norm(fc(feats)), and each layer projects ctx with its own
k_proj/v_proj (+ k_norm, RoPE at the context positions).  They are cached per row and reconciled
against the committed tokens on every call (one SlotCache for all rows); only the block's K/V
are recomputed.

Checkpoint (z-lab): config architectures ["DFlashDraftModel"], Qwen3 fields, dflash_config
{block_size, mask_token_id, target_layer_ids} (older checkpoints: the three at top level),
optional input_embedding_scale / output_multiplier / final_logit_softcapping; weights fc.weight
[H, n * H], hidden_norm.weight, layers.{i}.* with self_attn.{q,k}_norm, norm.weight.  Embedding
and lm_head are the target's (embed_tokens.* / lm_head.* keys, if a checkpoint carries them, are
dropped).

Stopping inside an accepted block (EOS, stop strings, length) is the engine's job (Row.append), so
this drafter never changes the output: drafts are verified like any other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint_io import CheckpointError, check_keys, read_config
from ..engine.kv import SlotCache
from ..sampling import greedy_tokens, probs_from_logits
from ..types import DraftInput, DraftProposal, DrafterNeeds
from .base import Drafter, DrafterSpec, Family, TargetInfo, register_drafter
from .decoder_layer import DecoderLayer, RMSNorm
from .diffusion_model import Shape, expected_layer_keys, keep_and_join, load_weights
from .row_slots import RowSlots, surviving_prefix
from .speculators_format import native_config

DFLASH_ARCHITECTURES = ("DFlashDraftModel",)


@dataclass
class DFlashConfig:
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    embed_scale: float = 1.0
    logit_multiplier: float = 1.0
    softcap: float | None = None

    @staticmethod
    def from_config(cfg: dict, where: str) -> "DFlashConfig":
        sub = cfg.get("dflash_config") or {}

        def get(name, default=None):
            return sub.get(name, cfg.get(name, default))
        ids = get("target_layer_ids")
        if ids is None or get("mask_token_id") is None:
            raise CheckpointError(f"{where}: dflash_config needs target_layer_ids and mask_token_id")
        return DFlashConfig(int(get("block_size", 16)), int(get("mask_token_id")), [int(i) for i in ids],
                            float(get("input_embedding_scale", 1.0)),
                            float(get("output_multiplier", 1.0)), get("final_logit_softcapping"))


class DFlashHead(nn.Module):
    def __init__(self, s: Shape, num_features: int):
        super().__init__()
        self.fc = nn.Linear(num_features * s.hidden, s.hidden, bias=False)
        self.hidden_norm = RMSNorm(s.hidden, s.eps)
        self.layers = nn.ModuleList(DecoderLayer(s.layer) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.eps)
        self.rope = s.rope

    def context_kv(self, feats: torch.Tensor, pos: torch.Tensor) -> list[tuple]:
        """feats [1, n, num_features * H], pos [1, n] -> per layer (k, v) [1, kv_heads, n, head_dim]."""
        ctx = self.hidden_norm(self.fc(feats))
        rope = self.rope(ctx, pos)
        return [layer.self_attn.keys_values(ctx, rope) for layer in self.layers]

    def block(self, noise, pos, ctx_kv, ctx_valid):
        """noise [b, q, H] embedded block; pos [b, q]; ctx_kv per layer (k, v) [b, kv_heads, P, hd];
        ctx_valid [b, P] -> normed hidden [b, q, H].  The stateless form: tests and training."""
        b, q, _ = noise.shape
        allowed = torch.cat([ctx_valid[:, None, :].expand(b, q, -1),
                             ctx_valid.new_ones(b, q, q)], dim=2)
        return self.layers_over(noise, pos, allowed, ctx_kv)

    def layers_over(self, x, pos, allowed, ctx_kv):
        """x [b, q, H] embedded blocks; pos [b, q]; allowed [b, q, P + q] over [context, blocks];
        ctx_kv per layer (k, v) [b, kv_heads, P, hd] -> normed hidden [b, q, H]."""
        return self.layers_through(x, pos, allowed, [keep_and_join([], past) for past in ctx_kv])

    def layers_through(self, x, pos, allowed, extends):
        """x [b, q, H]; pos [b, q]; allowed [b, q, P + q]; extends: per layer the `extend` that
        appends the block's K/V after P context keys -> normed hidden [b, q, H]."""
        rope = self.rope(x, pos)
        for layer, extend in zip(self.layers, extends):
            x = layer(x, rope, allowed, extend)
        return self.norm(x)


class DFlashDrafter(Drafter):
    def __init__(self, head: DFlashHead, cfg: DFlashConfig, target: TargetInfo, seed: int = 0):
        if target.embed_tokens is None or target.lm_head is None:
            raise ValueError("dflash shares the target's embedding and lm_head: TargetInfo has none")
        self.head, self.cfg = head.eval(), cfg
        self.device = target.device  # where the head, its caches and its draws live
        self.embed, self.lm_head = target.embed_tokens, target.lm_head
        self.needs = DrafterNeeds(hidden_layers=tuple(i + 1 for i in cfg.target_layer_ids))
        # context K/V per row, positions 0, 1, ...; between calls it holds committed entries only
        self.kv = SlotCache(0, self.device)
        self.slots = RowSlots(self.kv)
        self.context: dict[int, list[int]] = {}  # the tokens at the positions a row has entries for
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def release(self, row_ids: list[int]) -> None:
        self.slots.drop(row_ids)
        for rid in row_ids:
            self.context.pop(rid, None)

    def _catch_up(self, inp: DraftInput) -> None:
        """Keep each row's cached entries whose token is still the committed one and that the
        new features do not cover, then add entries for the features handed over: O(new)."""
        for rid in self.slots.align(inp.row_ids):
            self.context[rid] = []
        feeds = []  # per row: (features [m, F] or None, first position)
        for r, (rid, ids) in enumerate(zip(inp.row_ids, inp.token_ids)):
            have, n_ids = self.context[rid], int(ids.shape[0])
            feats = inp.hidden_states[r] if inp.hidden_states else None
            start = inp.hidden_start[r] if inp.hidden_start else 0
            num_new = inp.num_new_committed[r] if inp.num_new_committed else None
            common, _ = surviving_prefix(have, ids, num_new)
            keep = min(common, start if feats is not None else n_ids, n_ids - 1)
            self.kv.truncate(r, keep)
            del have[keep:]
            end = start if feats is None else min(start + feats.shape[0], n_ids - 1)
            if end <= start:  # no new features: the row drafts from the entries it kept
                feeds.append((None, keep))
                continue
            if start > keep:
                raise RuntimeError(f"dflash drafter, row {rid}: needs target features from "
                                   f"position {keep} but got them from {start}")
            feeds.append((feats[keep - start:end - start], keep))
            have += ids[keep:end].tolist()
        width = max((f.shape[0] for f, _ in feeds if f is not None), default=0)
        if width:
            self._add_context(feeds, width)

    def _add_context(self, feeds: list, width: int) -> None:
        """Append each row's new context entries as one padded block."""
        b, dtype = len(feeds), self.head.fc.weight.dtype
        feat_dim = next(f.shape[-1] for f, _ in feeds if f is not None)
        feats = torch.zeros(b, width, feat_dim, dtype=dtype, device=self.device)
        for r, (f, _) in enumerate(feeds):
            if f is not None:
                feats[r, :f.shape[0]] = f.to(dtype)
        pos, real = self.kv.ragged_block([p for _, p in feeds],
                                         [0 if f is None else f.shape[0] for f, _ in feeds])
        self.kv.append(pos, self.head.context_kv(feats, pos), real)

    @torch.inference_mode()
    def propose(self, inp: DraftInput) -> DraftProposal:
        batch = len(inp.row_ids)
        block_len = min(inp.num_draft_tokens, self.cfg.block_size - 1) + 1
        if block_len < 2:
            return DraftProposal.empty(batch, self.device)
        self._catch_up(inp)
        dev = self.device
        ids = torch.full((batch, block_len), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        # each row's last committed token and its position: host values, copied over once
        ids[:, 0] = torch.stack([t[-1] for t in inp.token_ids]).to(device=dev, dtype=torch.long)
        pos = (torch.tensor([len(t) - 1 for t in inp.token_ids], device=dev)[:, None]
               + torch.arange(block_len, device=dev))
        dtype = self.head.fc.weight.dtype
        noise = self.embed(ids).to(dtype) * self.cfg.embed_scale
        # every block position sees the row's context and the whole block
        allowed = torch.cat([self.kv.valid[:, None, :].expand(batch, block_len, -1),
                             self.kv.valid.new_ones(batch, block_len, block_len)], dim=2)
        committed = self.kv.width
        self.kv.reserve(pos)
        try:
            extends = [self.kv.extend_for(i) for i in range(len(self.head.layers))]
            hidden = self.head.layers_through(noise, pos, allowed, extends)[:, 1:]
        finally:
            self.kv.crop(committed)  # forget the block
        logits = self._logits(hidden)  # [batch, block_len - 1, vocab]
        if inp.sampling.greedy:
            return DraftProposal.chain(greedy_tokens(logits))
        probs = probs_from_logits(logits, inp.sampling)
        gens = inp.generators or [None] * batch
        drafts = torch.stack([torch.multinomial(probs[r], 1, generator=gens[r] or self.generator)[:, 0]
                              for r in range(batch)])
        return DraftProposal.chain(drafts, probs)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight
        logits = self.lm_head(hidden.to(weight.dtype)).double() * self.cfg.logit_multiplier
        if self.cfg.softcap:
            cap = float(self.cfg.softcap)
            logits = torch.tanh(logits / cap) * cap
        return logits


def load_dflash_head(folder: str, target: TargetInfo) -> tuple[DFlashHead, DFlashConfig]:
    cfg = native_config(read_config(folder), folder)  # a speculators config becomes z-lab's
    where = os.path.join(folder, "config.json")
    arch = (cfg.get("architectures") or ["<none>"])[0]
    if arch not in DFLASH_ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {arch!r} is not DFlash "
                              f"(known: {', '.join(DFLASH_ARCHITECTURES)})")
    dcfg = DFlashConfig.from_config(cfg, where)
    s = Shape.from_config(cfg, where, qkv_bias=False, qk_norm=True)
    if s.hidden != target.hidden_size:
        raise CheckpointError(f"{where}: hidden_size {s.hidden} differs from the target's "
                              f"{target.hidden_size} (dflash shares the target's embedding)")
    bad = [i for i in dcfg.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
        raise CheckpointError(f"{where}: target_layer_ids {bad} outside the target's "
                              f"{target.num_layers} layers")
    vocab = target.embed_tokens.num_embeddings if target.embed_tokens is not None else target.vocab_size
    if not 0 <= dcfg.mask_token_id < vocab:
        raise CheckpointError(f"{where}: mask_token_id {dcfg.mask_token_id} is outside the target's "
                              f"embedding of {vocab} rows")
    if dcfg.block_size < 2:
        raise CheckpointError(f"{where}: block_size {dcfg.block_size} leaves no draft tokens")
    n = len(dcfg.target_layer_ids)
    expected = {"fc.weight": (s.hidden, n * s.hidden), "hidden_norm.weight": (s.hidden,),
                "norm.weight": (s.hidden,)}
    expected.update(expected_layer_keys(s, "layers."))
    state, source = load_weights(folder)
    # explicit drops: the target's embedding and head are used instead
    state = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "lm_head."))}
    check_keys(state, expected, source)
    head = DFlashHead(s, n)
    head.load_state_dict(state, strict=True)
    return head.to(device=target.device, dtype=target.dtype).eval(), dcfg


FAMILY = Family("dflash", needs_weights=True, reads_hidden_states=True,
                 architectures=DFLASH_ARCHITECTURES, speculators_type="dflash",
                 vllm_method="dflash", sglang_algorithm="DFLASH",
                 sglang_plugin_name="SPECPLUG_DFLASH")


@register_drafter(FAMILY)
def build(spec: DrafterSpec, target: TargetInfo) -> DFlashDrafter:
    if not spec.path:
        raise ValueError("method 'dflash' needs --drafter PATH (a z-lab DFlash checkpoint folder)")
    head, cfg = load_dflash_head(spec.path, target)
    if "block_size" in spec.options:
        cfg.block_size = int(spec.options["block_size"])
    return DFlashDrafter(head, cfg, target, int(spec.options.get("seed", 0)))
