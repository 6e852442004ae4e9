"""Train a SpecDiff drafter: a small masked-diffusion LM (Dream layout) distilled from the target.

What trains is what drafts: the module is `specplug.drafters.diffusion_model.DiffusionLM`, fed
exactly as `SpecDiffDrafter` feeds it without a cache (context + block in one forward, attention
bidirectional unless `causal`, positions 0..n-1, block position j scored at index
len(context) - 1 + j because of shift_logits), and its training states include the ones its own
k-step sampler visits (the drafter's own `_unmask` picks what gets filled).

  model   `hidden` (192) x `layers` (4), embeddings tied to the lm_head, over the target's
          vocabulary plus one appended [MASK] row (mask id = target vocab; the drafter already
          treats ids >= the target's vocabulary as no tokens).  The embedding starts as
          E_target @ P, P the top `hidden` principal directions of the target's embedding, so
          every token starts where the target puts it.  bf16 export: 49153 x 192 x 2 B = 18.9 MB
          of embedding + ~0.9 MB per layer.
  sample  per row: a data sequence, a block start s uniform in its answer (drafting happens only
          in answers), block = tokens s .. s + gamma - 1, context = up to `max_context` tokens
          before s.  E.g. gamma 3, tokens [p0 p1 p2 | a0 a1 a2 a3], s = 4: context p0 p1 p2 a0,
          block a1 a2 a3; the output at a0 scores a1, at block slot 0 scores a2, ...
  state   which block positions are already filled when the model predicts the rest.  Every
          `collect_every_n_steps` steps the batch first runs the current model's greedy sampler
          (`denoise_steps` steps, `unmask_order`) over its blocks and each row trains on one of
          the states it visited: filled slots hold the model's own guesses, as at inference.
          Other steps fill u ~ U{0..gamma-1} random slots with the data's tokens.
  loss    at each masked slot: (1 - alpha) * CE(data token) + alpha * KL(teacher || model), the
          teacher = softmax(final hidden @ target lm_head) from the data's last feature block:
          the target's distribution for that token given the true prefix, no target forward.
          On sampler states a slot counts only if every filled slot before it holds the data's
          token: after a wrong guess nothing is accepted, so what follows it teaches noise.
  stored  `teacher_topk` K > 0: each position's top-K teacher logits are computed once into
          <output>/teacher_top{K}.safetensors and the teacher is the softmax over those K (for
          targets too costly to re-read); with K = vocab it trains to the recomputed weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from ..drafters.diffusion_model import DiffusionLM, Shape
from ..drafters.specdiff import UNMASK_ORDERS, SpecDiffDrafter
from ..types import SamplingParams
from .data import Sequence
from .eagle3_train import batch_schedule, load_for_target
from .trainer import LoopConfig, add_loop_arguments, loop_settings, train_loop


@dataclass
class Config:
    target: str
    data: str
    output: str
    progress: bool = True
    hidden: int = 192
    layers: int = 4
    heads: int = 3
    intermediate: int = 512
    causal: bool = False
    gamma: int = 5  # block size trained for
    denoise_steps: int | None = None  # sampler steps k (None: gamma, the drafter's default)
    unmask_order: str = "entropy"
    max_context: int = 96
    alpha: float = 0.5  # weight of the KD term
    collect_every_n_steps: int = 2  # 0: never run the sampler, random states only
    teacher_topk: int = 0  # 0: teacher recomputed from hidden states; K: stored top-K logits
    steps: int = 1500
    stop_at: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    bf16_autocast: bool = True
    save_every: int = 100
    max_minutes: float | None = None


def check_config(cfg: Config) -> None:
    problems = [
        (not 0.0 <= cfg.alpha <= 1.0, f"--alpha {cfg.alpha} must be in [0, 1]"),
        (cfg.gamma < 1, f"--gamma {cfg.gamma} must be >= 1"),
        (cfg.denoise_steps is not None and cfg.denoise_steps < 1, f"--denoise-steps {cfg.denoise_steps} must be >= 1"),
        (cfg.unmask_order not in UNMASK_ORDERS, f"--unmask-order {cfg.unmask_order!r}: choose one of {', '.join(UNMASK_ORDERS)}"),
        (cfg.hidden % cfg.heads != 0 or (cfg.hidden // cfg.heads) % 2, f"--hidden {cfg.hidden} must split into --heads {cfg.heads} of even size"),
        (cfg.max_context < 1 or cfg.batch_size < 1 or cfg.steps < 1, "--max-context, --batch-size and --steps must be >= 1"),
        (cfg.collect_every_n_steps < 0, f"--collect-every-n-steps {cfg.collect_every_n_steps} must be >= 0"),
        (cfg.teacher_topk < 0, f"--teacher-topk {cfg.teacher_topk} must be >= 0"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


# -- model ---------------------------------------------------------------------------------------
def dream_config(cfg: Config, target_cfg) -> dict:
    vocab = target_cfg.vocab_size
    rope = getattr(target_cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta") or getattr(target_cfg, "rope_theta", None) or 10000.0)
    return {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads,
            "head_dim": cfg.hidden // cfg.heads, "rms_norm_eps": float(target_cfg.rms_norm_eps),
            "rope_theta": theta, "vocab_size": vocab + 1, "mask_token_id": vocab,
            "tie_word_embeddings": True, "attention_bias": False, "is_causal": cfg.causal,
            "shift_logits": True, "hidden_act": "silu", "torch_dtype": "bfloat16"}


def build_model(dcfg: dict, target_embed: torch.Tensor, seed: int) -> DiffusionLM:
    """A fresh drafter whose embedding (and tied lm_head) starts as E_target @ P."""
    torch.manual_seed(seed)
    s = Shape.from_config(dcfg, "drafter config", qkv_bias=False, qk_norm=False)
    model = DiffusionLM(s, dcfg["vocab_size"], dcfg["mask_token_id"], dcfg["is_causal"],
                        dcfg["shift_logits"]).float()
    e = target_embed.double()  # [V, H_target]
    if s.hidden > e.shape[1]:
        raise ValueError(f"--hidden {s.hidden} exceeds the target's hidden size {e.shape[1]}")
    centred = e - e.mean(0)
    _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    proj = vecs[:, -s.hidden:].flip(1)  # [H_target, hidden] top principal directions
    with torch.no_grad():
        emb = model.embed_tokens.weight
        emb[:e.shape[0]] = (e @ proj).float()
        mask_row = torch.randn(s.hidden, generator=torch.Generator().manual_seed(seed))
        emb[e.shape[0]:] = mask_row * emb[:e.shape[0]].norm(dim=1).mean() / mask_row.norm()
    model.lm_head.weight = model.embed_tokens.weight  # tied, as exported
    return model


def block_logits(model: DiffusionLM, contexts: list[list[int]], block: torch.Tensor) -> torch.Tensor:
    """contexts: token ids per row; block [b, gamma] (mask id where empty) -> logits
    [b, gamma, vocab] for the block slots: SpecDiffDrafter's uncached forward (same ids,
    positions, attention), with the lm_head applied to the block slots only."""
    b, gamma = block.shape
    lens = torch.tensor([len(c) for c in contexts])
    width = int(lens.max()) + gamma
    ids = torch.zeros(b, width, dtype=torch.long)
    real = torch.zeros(b, width, dtype=torch.bool)
    for r, c in enumerate(contexts):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        ids[r, len(c):len(c) + gamma] = block[r]
        real[r, :len(c) + gamma] = True
    pos = torch.arange(width).expand(b, width)
    allowed = real[:, None, :].expand(b, width, width)
    if model.is_causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(width, dtype=torch.bool)  # padding queries see themselves
    idx = lens[:, None] - (1 if model.shift_logits else 0) + torch.arange(gamma)
    logits, _ = model(ids, pos, allowed, score=idx)
    return logits


@torch.no_grad()
def sampler_states(model: DiffusionLM, contexts: list[list[int]], gamma: int, steps: int | None,
                   order: str, target_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the drafter's greedy k-step sampler; returns the states it predicted from:
    blocks [k, b, gamma] and filled [k, b, gamma] bool (state 0 is all mask)."""
    drafter = SpecDiffDrafter(model, target_vocab, denoise_steps=steps, unmask_order=order)
    k = min(steps or gamma, gamma)
    block = torch.full((len(contexts), gamma), model.mask_token_id, dtype=torch.long)
    done = torch.zeros(len(contexts), gamma, dtype=torch.bool)
    blocks, filled = [], []
    for step in range(k):
        blocks.append(block.clone())
        filled.append(done.clone())
        logits = block_logits(model, contexts, block).float()
        logits[..., target_vocab:] = float("-inf")  # mask row (and nothing else) past the vocab
        want = -(-gamma * (step + 1) // k)
        drafter._unmask(block, done, torch.zeros_like(done), logits, want, SamplingParams())
    model.train()  # the drafter put it in eval mode (no dropout: only the flag changes)
    return torch.stack(blocks), torch.stack(filled)


# -- data ----------------------------------------------------------------------------------------
def usable(seqs: list[Sequence], gamma: int) -> list[Sequence]:
    """Sequences with a full block after at least one token."""
    return [s for s in seqs if len(s.tokens) >= gamma + 1]


def make_batch_at(seqs: list[Sequence], cfg: Config, mask_id: int, hidden: int, stored: dict | None):
    """step -> batch dict, a pure function of the step (resume sees the same batches)."""
    pick = batch_schedule(len(seqs), cfg.batch_size, cfg.seed)

    def batch_at(step: int) -> dict:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        contexts, labels, finals, top_ids, top_logits = [], [], [], [], []
        for i in pick(step):
            s = seqs[i]
            n = len(s.tokens)
            lo, hi = min(max(1, s.prompt_len), n - cfg.gamma), n - cfg.gamma
            start = lo + int(torch.randint(hi - lo + 1, (1,), generator=g))
            contexts.append(s.tokens[max(0, start - cfg.max_context):start].tolist())
            labels.append(s.tokens[start:start + cfg.gamma])
            rows = slice(start - 1, start - 1 + cfg.gamma)  # feature p - 1 predicts token p
            if stored is None:
                finals.append(s.hidden[rows, -hidden:].float())
            else:
                base = int(stored["offsets"][i])
                top_ids.append(stored["ids"][base + rows.start:base + rows.stop].long())
                top_logits.append(stored["logits"][base + rows.start:base + rows.stop].float())
        labels = torch.stack(labels)  # [b, gamma]
        filled = torch.zeros_like(labels, dtype=torch.bool)
        for r in range(len(labels)):  # u ~ U{0..gamma-1} filled slots, chosen at random
            u = int(torch.randint(cfg.gamma, (1,), generator=g))
            filled[r, torch.randperm(cfg.gamma, generator=g)[:u]] = True
        collect = cfg.collect_every_n_steps > 0 and step % cfg.collect_every_n_steps == 0
        k = min(cfg.denoise_steps or cfg.gamma, cfg.gamma)
        batch = {"contexts": contexts, "labels": labels, "filled": filled,
                 "block": torch.where(filled, labels, mask_id), "collect": collect,
                 "state_pick": torch.randint(k, (len(labels),), generator=g)}
        if stored is None:
            batch["final"] = torch.stack(finals)  # [b, gamma, H_target]
        else:
            batch["top_ids"], batch["top_logits"] = torch.stack(top_ids), torch.stack(top_logits)
        return batch
    return batch_at


def stored_teacher(seqs: list[Sequence], lm_head: torch.Tensor, k: int, hidden: int,
                   folder: str, source: str) -> dict:
    """Top-k teacher logits of every position (row offsets[i] + p - 1 scores token p of
    sequence i), computed once into folder/teacher_top{k}.safetensors and reused after."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, f"teacher_top{k}.safetensors")
    offsets = torch.tensor([0] + [len(s.hidden) for s in seqs]).cumsum(0)
    if os.path.isfile(path):
        stored = load_file(path)
        if not torch.equal(stored.get("offsets", torch.empty(0)), offsets):
            raise ValueError(f"{path}: made from other data ({source}); delete it or pick another --output")
        return stored
    ids, logits = [], []
    with torch.no_grad():
        for s in seqs:
            for chunk in s.hidden[:, -hidden:].split(512):
                top = (chunk.float() @ lm_head.T).topk(k, dim=-1)
                ids.append(top.indices.int())
                logits.append(top.values)
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    save_file({"ids": torch.cat(ids), "logits": torch.cat(logits), "offsets": offsets}, tmp)
    os.replace(tmp, path)
    return load_file(path)


# -- loss ----------------------------------------------------------------------------------------
def teacher_probs(batch: dict, lm_head: torch.Tensor) -> torch.Tensor:
    """[b, gamma, vocab] the target's distribution at each block slot."""
    if "final" in batch:
        return torch.softmax(batch["final"] @ lm_head.T, dim=-1)
    dense = torch.full((*batch["top_ids"].shape[:2], lm_head.shape[0]), float("-inf"))
    return torch.softmax(dense.scatter(-1, batch["top_ids"], batch["top_logits"]), dim=-1)


def diffusion_loss(model: DiffusionLM, batch: dict, lm_head: torch.Tensor, cfg: Config):
    """lm_head [V, H_target] the target's.  Returns the loss and metrics."""
    labels, block, filled = batch["labels"], batch["block"], batch["filled"]
    vocab = lm_head.shape[0]
    weight = (~filled).float()
    if batch["collect"]:
        blocks, states = sampler_states(model, batch["contexts"], cfg.gamma, cfg.denoise_steps,
                                        cfg.unmask_order, vocab)
        rows = torch.arange(len(labels))
        block, filled = blocks[batch["state_pick"], rows], states[batch["state_pick"], rows]
        wrong = filled & (block != labels)
        # a slot counts while no filled slot before it holds a wrong guess
        clean = (wrong.cumsum(1) - wrong.long()) == 0
        weight = (~filled & clean).float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        logits = block_logits(model, batch["contexts"], block)
    logp = torch.log_softmax(logits.float()[..., :vocab], dim=-1)  # mask row is never a label
    with torch.no_grad():
        teacher = teacher_probs(batch, lm_head)
    ce = -logp.gather(-1, labels[..., None])[..., 0]
    kl = (torch.special.xlogy(teacher, teacher) - teacher * logp).sum(-1)
    count = weight.sum().clamp(min=1)
    loss = (((1 - cfg.alpha) * ce + cfg.alpha * kl) * weight).sum() / count
    hit = (logp.argmax(-1) == teacher.argmax(-1)).float()
    first = weight[:, 0] * (~filled).all(1).float()  # slot 0 of all-mask blocks: the first draft
    ce, kl, hit = ce.detach(), kl.detach(), hit.detach()
    return loss, {"ce": (ce * weight).sum() / count, "kl": (kl * weight).sum() / count,
                  "acc": (hit * weight).sum() / count,
                  "acc_first": (hit[:, 0] * first).sum() / first.sum().clamp(min=1)}


# -- run -----------------------------------------------------------------------------------------
def train(cfg: Config) -> str:
    """Train (or resume) and export; returns the exported drafter folder (= cfg.output)."""
    from ..models.loading import load_causal_lm
    check_config(cfg)
    target = load_causal_lm(cfg.target, torch.float32)
    tc = target.config
    if cfg.teacher_topk > tc.vocab_size:
        raise ValueError(f"--teacher-topk {cfg.teacher_topk} exceeds the vocabulary ({tc.vocab_size})")
    seqs, meta = load_for_target(cfg.data, tc)
    seqs = usable(seqs, cfg.gamma)
    if not seqs:
        raise ValueError(f"{cfg.data}: no sequence has {cfg.gamma + 1} tokens")
    lm_head = target.get_output_embeddings().weight.detach().float()
    dcfg = dream_config(cfg, tc)
    model = build_model(dcfg, target.get_input_embeddings().weight.detach(), cfg.seed)
    stored = None
    if cfg.teacher_topk:
        stored = stored_teacher(seqs, lm_head, cfg.teacher_topk, tc.hidden_size, cfg.output,
                                cfg.data)
    batch_at = make_batch_at(seqs, cfg, dcfg["mask_token_id"], tc.hidden_size, stored)
    loop = LoopConfig(cfg.output, cfg.steps, cfg.lr, save_every=cfg.save_every,
                      max_minutes=cfg.max_minutes, stop_at=cfg.stop_at, progress=cfg.progress)
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("target", "data", "output", "progress", "steps", "stop_at", "max_minutes",
                             "save_every")}
    reached = train_loop(model, batch_at, lambda m, b: diffusion_loss(m, b, lm_head, cfg), loop,
                         extra={"config": dcfg, "settings": settings})
    export(model, dcfg, cfg.output, {"trained_steps": reached, "data_tokens": meta["num_tokens"],
                                     "data_source": meta.get("source", "self"),
                                     "train_config": {**settings, "steps": cfg.steps,
                                                      "stop_at": cfg.stop_at}})
    return cfg.output


def export(model: DiffusionLM, dcfg: dict, folder: str, info: dict,
           dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json + model.safetensors in Dream's layout (tied: no lm_head.weight)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {f"model.{k}": v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**dcfg, "specplug_training": info}, f, indent=1)


def add_arguments(p) -> None:
    d = Config("", "", "")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--causal", action="store_true", help="causal attention (exact KV caching at inference)")
    p.add_argument("--gamma", type=int, default=d.gamma, help="block size (draft tokens per step)")
    p.add_argument("--denoise-steps", type=int, default=None, help="sampler steps k (default: gamma)")
    p.add_argument("--unmask-order", default=d.unmask_order, choices=UNMASK_ORDERS)
    p.add_argument("--max-context", type=int, default=d.max_context, help="context tokens before the block")
    p.add_argument("--alpha", type=float, default=d.alpha, help="loss = (1 - alpha) CE + alpha KD")
    p.add_argument("--collect-every-n-steps", type=int, default=d.collect_every_n_steps,
                   help="train on the sampler's own states every N steps (0: never)")
    p.add_argument("--teacher-topk", type=int, default=0,
                   help="stored-logit mode: precompute the teacher's top-K logits (0: recompute)")
    add_loop_arguments(p, d)


def config_from_args(args, target: str) -> Config:
    names = ("hidden", "layers", "heads", "intermediate", "causal", "gamma", "denoise_steps",
             "unmask_order", "max_context", "alpha", "collect_every_n_steps", "teacher_topk")
    return Config(target, args.data, args.output, progress=True,
                  **{n: getattr(args, n) for n in names}, **loop_settings(args))
