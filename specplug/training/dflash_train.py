"""Train a DFlash block-diffusion head on a data folder of target features (see data.py); export it
in z-lab's layout, which specplug.drafters.dflash (and the converters, vLLM, SGLang) load.

The trained module IS `specplug.drafters.dflash.DFlashHead`, run through the same layers as at
inference, so what trains is what drafts.  At inference, a row whose committed tokens end in
x_{N-1} drafts with
  context = features of positions 0 .. N - 2 (the target has not read x_{N-1} yet)
  block   = [x_{N-1}, MASK, ..., MASK] at positions N - 1 ... N - 2 + block_size
and block position j predicts x_{N-1+j}.  Training picks `anchors` positions a per sequence in
the answer and builds exactly that: block k = [x_a, MASK * (block_size - 1)] at positions
a .. a + block_size - 1 sees context positions < a and its own block (bidirectionally), never
another block.  All blocks of a batch go through one pass with a block-diagonal mask, e.g.
block_size 3, anchors a=5 and a=9 of one sequence (keys: context 0..E-1, then the 6 queries):
  queries 5,6,7   see context 0..4   and queries 5,6,7
  queries 9,10,11 see context 0..8   and queries 9,10,11
Loss at block position j = cross-entropy to the target's own distribution for x_{a+j} (softmax of
its lm_head over the saved final hidden state at position a + j - 1), weighted exp(-(j-1)/decay).

Data folders store HF hidden_states indices (e.g. [2, 15, 27] + the final 30); z-lab reads
hidden_states[id + 1], so target_layer_ids = those indices - 1 (e.g. [1, 14, 26]).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from ..drafters.dflash import DFlashHead
from ..drafters.diffusion_model import Shape
from .data import Sequence
from .eagle3_train import batch_schedule, frequency_vocab, load_for_target
from .trainer import LoopConfig, add_loop_arguments, loop_settings, train_loop


@dataclass
class Config:
    target: str
    data: str
    output: str
    progress: bool = True
    layers: int = 1
    block_size: int = 8  # anchor + block_size - 1 drafts
    anchors: int = 16  # blocks per sequence per step
    mask_token_id: int | None = None  # None: an unused special token (see pick_mask_token)
    intermediate_size: int | None = None  # None: the target's
    steps: int = 600
    stop_at: int | None = None  # stop early at this step (the lr schedule still spans `steps`)
    batch_size: int = 4  # sequences per step
    seq_len: int = 256  # tokens kept per sequence
    answer_context: int | None = 64  # windows start this many tokens before the answer
    loss_decay: float = 4.0  # block position j weighs exp(-(j - 1) / loss_decay)
    # score only the train_vocab most frequent tokens of the data (target and head softmax both
    # restricted to them): ~vocab / train_vocab times cheaper on CPU; None = the full vocabulary.
    # Inference still uses the whole lm_head, the other tokens are just never trained down.
    train_vocab: int | None = None
    lr: float = 1e-3
    seed: int = 0
    bf16_autocast: bool = True  # faster on AVX-512 BF16 CPUs; weights stay float32
    save_every: int = 50
    max_minutes: float | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Config("", "", "")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer layers in the head")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="block = the last token + block_size - 1 masks (drafts per step)")
    p.add_argument("--anchors", type=int, default=d.anchors, help="blocks per sequence per step")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="token id of the mask (default: an unused special token of the tokenizer)")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: the target's)")
    add_loop_arguments(p, d)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--answer-context", type=int, default=d.answer_context,
                   help="start each training window this many tokens before the answer")
    p.add_argument("--loss-decay", type=float, default=d.loss_decay)
    p.add_argument("--train-vocab", type=int, default=None,
                   help="score only this many most frequent tokens in the loss (cheaper; default all)")


def config_from_args(args: argparse.Namespace, target: str) -> Config:
    return Config(target, args.data, args.output, layers=args.layers, block_size=args.block_size,
                  anchors=args.anchors, mask_token_id=args.mask_token_id,
                  intermediate_size=args.intermediate_size, seq_len=args.seq_len,
                  answer_context=args.answer_context, loss_decay=args.loss_decay,
                  train_vocab=args.train_vocab, **loop_settings(args))


# -- the head and its config ---------------------------------------------------------------------
def head_config(tc, cfg: Config, mask_token_id: int, target_layer_ids: list[int]) -> dict:
    """z-lab DFlashDraftModel config (Qwen3 fields) sized like the target's layers."""
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    return {"architectures": ["DFlashDraftModel"], "model_type": "qwen3",
            "hidden_size": tc.hidden_size, "intermediate_size": cfg.intermediate_size or tc.intermediate_size,
            "num_hidden_layers": cfg.layers, "num_attention_heads": tc.num_attention_heads,
            "num_key_value_heads": tc.num_key_value_heads,
            "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
            "rms_norm_eps": tc.rms_norm_eps, "rope_theta": theta,
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
            "max_position_embeddings": tc.max_position_embeddings, "hidden_act": "silu",
            "attention_bias": False, "vocab_size": tc.vocab_size, "tie_word_embeddings": False,
            "num_target_layers": tc.num_hidden_layers, "target_hidden_size": tc.hidden_size,
            "block_size": cfg.block_size,  # older readers look at the top level
            "dflash_config": {"block_size": cfg.block_size, "mask_token_id": mask_token_id,
                              "target_layer_ids": list(target_layer_ids)},
            "torch_dtype": "bfloat16"}


def build_head(hcfg: dict, final_norm: torch.Tensor, seed: int) -> DFlashHead:
    """A fresh head (HF-style normal(0, 0.02) linears); its output norm starts as the target's,
    since the target's lm_head reads the output."""
    torch.manual_seed(seed)
    s = Shape.from_config(hcfg, "dflash head", qkv_bias=False, qk_norm=True)
    head = DFlashHead(s, len(hcfg["dflash_config"]["target_layer_ids"]))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        head.norm.weight.copy_(final_norm.float())
    return head.float()


def pick_mask_token(tokenizer, seqs: list[Sequence], vocab: int) -> int:
    """The highest-id special token that is not BOS/EOS/PAD/UNK and never occurs in the data;
    else the highest id that never occurs in the data."""
    seen = torch.zeros(vocab, dtype=torch.bool)
    for s in seqs:
        seen[s.tokens[s.tokens < vocab]] = True
    reserved = set()
    specials: list[int] = []
    if tokenizer is not None:
        reserved = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                tokenizer.unk_token_id) if i is not None}
        specials = sorted(i for i in tokenizer.get_added_vocab().values() if i < vocab)
    for i in reversed(specials):
        if i not in reserved and not seen[i]:
            return i
    unused = (~seen).nonzero().flatten().tolist()
    unused = [i for i in unused if i not in reserved]
    if not unused:
        raise ValueError("every token id occurs in the data: pass --mask-token-id")
    return unused[-1]


# -- batches ---------------------------------------------------------------------------------------
def collate(seqs: list[Sequence], seq_len: int, aux_width: int, answer_context: int | None) -> dict:
    """Windows of <= seq_len tokens (starting answer_context tokens before the answer, RoPE only
    sees relative positions): tokens [B, L], aux [B, L - 1, aux_width], final [B, L - 1, H],
    lengths [B], answer_start [B] (first answer position inside the window)."""
    L = min(seq_len, max(len(s.tokens) for s in seqs))
    feat = seqs[0].hidden.shape[1]
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    hidden = torch.zeros(len(seqs), L - 1, feat, dtype=torch.float32)
    lengths, starts = [], []
    for r, s in enumerate(seqs):
        start = 0 if answer_context is None else max(0, s.prompt_len - answer_context)
        start = min(start, max(0, len(s.tokens) - seq_len))
        toks = s.tokens[start:start + seq_len]
        tokens[r, :len(toks)] = toks
        hidden[r, :len(toks) - 1] = s.hidden[start:start + len(toks) - 1].float()
        lengths.append(len(toks))
        starts.append(max(0, s.prompt_len - start))
    return {"tokens": tokens, "aux": hidden[..., :aux_width], "final": hidden[..., aux_width:],
            "lengths": torch.tensor(lengths), "answer_start": torch.tensor(starts)}


def pick_anchors(lengths: torch.Tensor, starts: torch.Tensor, count: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, `count` distinct anchors a in [answer_start, length - 2] (x_{a+1} must exist),
    sorted: anchors [B, count] int64, ok [B, count] bool (False pads short rows)."""
    anchors = torch.zeros(len(lengths), count, dtype=torch.long)
    ok = torch.zeros(len(lengths), count, dtype=torch.bool)
    for r, (n, lo) in enumerate(zip(lengths.tolist(), starts.tolist())):
        lo = min(max(lo, 0), n - 1)
        cand = n - 1 - lo
        if cand <= 0:
            continue
        take = torch.randperm(cand, generator=generator)[:count].sort().values + lo
        anchors[r, :len(take)], ok[r, :len(take)] = take, True
    return anchors, ok


def make_batch(seqs: list[Sequence], cfg: Config, aux_width: int, step: int) -> dict:
    batch = collate(seqs, cfg.seq_len, aux_width, cfg.answer_context)
    # anchors are a pure function of (seed, step): a resumed run sees the same blocks
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    batch["anchors"], batch["anchor_ok"] = pick_anchors(batch["lengths"], batch["answer_start"],
                                                        cfg.anchors, g)
    return batch


# -- the loss --------------------------------------------------------------------------------------
def block_mask(anchors: torch.Tensor, ctx_len: int, block_size: int) -> torch.Tensor:
    """anchors [B, K] -> allowed [B, K * block_size, ctx_len + K * block_size]: a block sees context
    positions before its anchor and all of its own positions."""
    B, K = anchors.shape
    q = K * block_size
    see_ctx = torch.arange(ctx_len)[None, None, :] < anchors[:, :, None]  # [B, K, ctx]
    see_ctx = see_ctx[:, :, None, :].expand(B, K, block_size, ctx_len).reshape(B, q, ctx_len)
    blk = torch.arange(q) // block_size
    own = (blk[:, None] == blk[None, :]).expand(B, q, q)
    return torch.cat([see_ctx, own], dim=2)


def block_hidden(head: DFlashHead, batch: dict, embed: torch.Tensor, block_size: int,
                 mask_token_id: int) -> torch.Tensor:
    """Every block of the batch in one pass -> normed hidden [B, K, block_size, H]; what
    DFlashHead.block computes for each block alone (per-block mask instead of one context)."""
    tokens, aux, anchors = batch["tokens"], batch["aux"], batch["anchors"]
    B, K = anchors.shape
    E = aux.shape[1]
    ctx_kv = head.context_kv(aux, torch.arange(E).expand(B, E))
    ids = torch.full((B, K, block_size), mask_token_id, dtype=torch.long)
    ids[:, :, 0] = tokens.gather(1, anchors)
    pos = (anchors[:, :, None] + torch.arange(block_size)).reshape(B, K * block_size)
    allowed = block_mask(anchors, E, block_size)
    x = F.embedding(ids.reshape(B, -1), embed)
    return head.layers_over(x, pos, allowed, ctx_kv).view(B, K, block_size, -1)


def block_loss(head: DFlashHead, batch: dict, embed: torch.Tensor, lm_head: torch.Tensor,
               block_size: int, mask_token_id: int, decay: float) -> tuple[torch.Tensor, dict]:
    """embed [V, H] and lm_head [V, H]: the target's (frozen).  Returns the weighted CE and
    metrics acc1 (first draft), acc (all drafts) and tau (1 + mean run of correct drafts)."""
    final, anchors, ok, n = batch["final"], batch["anchors"], batch["anchor_ok"], batch["lengths"]
    B, K = anchors.shape
    E = final.shape[1]
    j = torch.arange(block_size)
    hidden = block_hidden(head, batch, embed, block_size, mask_token_id)[:, :, 1:]
    logp = torch.log_softmax((hidden @ lm_head.T).float(), dim=-1)
    # draft j of anchor a is x_{a+j}; the target's distribution for it sits at position a + j - 1
    where = anchors[:, :, None] + j[:-1]  # [B, K, block_size - 1]
    valid = ok[:, :, None] & (where <= (n - 2)[:, None, None])
    with torch.no_grad():
        h_t = final.gather(1, where.clamp(max=E - 1).reshape(B, -1, 1).expand(-1, -1, final.shape[-1]))
        teacher = torch.softmax((h_t @ lm_head.T).float(), dim=-1).view_as(logp)
    ce = -(teacher * logp).sum(-1)  # [B, K, block_size - 1]
    w = torch.exp(-j[:-1].float() / decay) * valid
    loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
    with torch.no_grad():
        hit = (logp.argmax(-1) == teacher.argmax(-1)) & valid
        count = valid.sum().clamp(min=1)
        run = hit.long().cumprod(-1).sum(-1)  # accepted drafts per block (greedy)
        metrics = {"acc1": hit[..., 0].sum() / valid[..., 0].sum().clamp(min=1),
                   "acc": hit.sum() / count,
                   "tau": 1 + run[ok].float().mean() if ok.any() else torch.tensor(1.0)}
    return loss, metrics


# -- training and export ---------------------------------------------------------------------------
def _check(cfg: Config, meta: dict, tc, mask_token_id: int) -> None:
    layers = meta["hidden_layers"]
    if len(layers) < 2 or min(layers[:-1]) < 1:
        raise ValueError(f"{cfg.data}: hidden_layers {layers} give no target layer for DFlash "
                         f"(it needs hidden_states indices >= 1 besides the final one)")
    for name, value, low in (("--block-size", cfg.block_size, 2), ("--anchors", cfg.anchors, 1),
                             ("--layers", cfg.layers, 1), ("--batch-size", cfg.batch_size, 1),
                             ("--seq-len", cfg.seq_len, 3), ("--steps", cfg.steps, 1)):
        if value < low:
            raise ValueError(f"{name} {value} must be at least {low}")
    if not 0 <= mask_token_id < tc.vocab_size:
        raise ValueError(f"--mask-token-id {mask_token_id} is outside the target's vocabulary "
                         f"of {tc.vocab_size}")
    if cfg.train_vocab is not None and not 1 <= cfg.train_vocab <= tc.vocab_size:
        raise ValueError(f"--train-vocab {cfg.train_vocab} must be in 1..{tc.vocab_size}")
    if not cfg.loss_decay > 0:
        raise ValueError(f"--loss-decay {cfg.loss_decay} must be positive")


def train(cfg: Config) -> str:
    """Train (or resume) and export; returns the exported head folder (= cfg.output)."""
    from ..models.loading import load_causal_lm, load_tokenizer
    target = load_causal_lm(cfg.target, torch.float32)
    tc = target.config
    seqs, meta = load_for_target(cfg.data, tc)
    mask_id = cfg.mask_token_id
    if mask_id is None:
        mask_id = pick_mask_token(load_tokenizer(cfg.target, required=False), seqs, tc.vocab_size)
    _check(cfg, meta, tc, mask_id)
    target_layer_ids = [i - 1 for i in meta["hidden_layers"][:-1]]
    hcfg = head_config(tc, cfg, mask_id, target_layer_ids)
    head = build_head(hcfg, target.model.norm.weight.detach(), cfg.seed)
    embed = target.get_input_embeddings().weight.detach().float()
    lm_head = target.get_output_embeddings().weight.detach().float()
    extra = {"config": hcfg}
    if cfg.train_vocab is not None:
        eos = tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id]
        scored = frequency_vocab(seqs, tc.vocab_size, cfg.train_vocab, tuple(i for i in eos if i is not None))
        lm_head, extra["train_vocab"] = lm_head[scored], scored
    aux_width = len(target_layer_ids) * tc.hidden_size
    pick = batch_schedule(len(seqs), cfg.batch_size, cfg.seed)

    def loss_fn(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            return block_loss(model, batch, embed, lm_head, cfg.block_size, mask_id, cfg.loss_decay)

    loop = LoopConfig(cfg.output, cfg.steps, cfg.lr, save_every=cfg.save_every,
                      max_minutes=cfg.max_minutes, stop_at=cfg.stop_at, progress=cfg.progress)
    reached = train_loop(head, lambda step: make_batch([seqs[i] for i in pick(step)], cfg, aux_width, step),
                         loss_fn, loop, extra=extra)
    export(head, hcfg, cfg.output,
           {"trained_steps": reached, "data_tokens": meta["num_tokens"],
            "train_config": {k: v for k, v in asdict(cfg).items()
                             if k not in ("target", "data", "output", "progress")},
            "data_source": meta.get("source", "self")})
    return cfg.output


def export(head: DFlashHead, hcfg: dict, folder: str, info: dict,
           dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json + model.safetensors (fc, hidden_norm, layers.*, norm); no embedding or
    lm_head, which are the target's.  The weights file is renamed into place."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in head.state_dict().items()}
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    tmp = os.path.join(folder, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**hcfg, "specplug_training": info}, f, indent=1)
    os.replace(tmp, os.path.join(folder, "config.json"))

