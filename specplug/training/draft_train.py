"""Train a classic draft model (a small Llama sharing the target's tokenizer) by distilling the
target's next-token distributions; export a plain HF folder that specplug's `draft` family,
vLLM's `draft_model` method and SGLang's standalone drafter all load.

No target forward pass is needed: a data folder (data.py) saves the target's final normed hidden
state per position, so the teacher is softmax(final @ lm_head^T) over the full vocabulary.  For a
window of tokens x_0 .. x_{L-1}, the draft reads x_0 .. x_{L-2} causally and its logits at
position p are pulled towards the teacher at p (which predicts x_{p+1}):
    loss = (1 - ce_weight) * CE(teacher, draft) + ce_weight * CE(x_{p+1}, draft)
(the soft CE equals KL(teacher || draft) plus the teacher's entropy, a constant).  The teacher is
computed once before training and kept as its top-k ids and probabilities per position.

Size: the tied embedding dominates (vocab x hidden), so a 49k vocabulary at hidden 192 is
~19 MB in bf16.  The embedding starts from the target's output embedding projected onto its top
`hidden_size` principal directions (E_draft = W @ P, rescaled), so tokens the target treats alike
start out alike.  Measured on SmolLM2 reference data (160 sequences, 40 steps, held-out KL):
random init 5.18, PCA init 5.08.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch

from .data import Sequence
from .eagle3_train import batch_schedule, collate, load_for_target
from .trainer import LoopConfig, add_loop_arguments, loop_settings, train_loop

# files of a HF tokenizer folder; copied byte for byte so same_tokenizer() sees the same one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer.model")


@dataclass
class Config:
    target: str
    data: str
    output: str
    hidden_size: int = 192
    num_layers: int = 2
    num_heads: int = 3
    num_kv_heads: int = 1
    intermediate_size: int = 512
    embed_init: str = "pca"  # "pca": E_target @ P; "random": HF's default init
    steps: int = 600
    stop_at: int | None = None  # stop early at this step (the lr schedule still spans `steps`)
    batch_size: int = 4  # windows per step
    seq_len: int = 256  # tokens per window
    answer_context: int | None = 64  # start windows this many tokens before the answer
    ce_weight: float = 0.0  # weight of CE on the data's own next tokens (rest: the teacher)
    teacher_top_k: int = 32  # teacher probabilities kept per position
    lr: float = 2e-3
    seed: int = 0
    bf16_autocast: bool = True  # weights stay float32
    save_every: int = 50
    max_minutes: float | None = None
    progress: bool = True


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--hidden-size", type=int, default=192)
    a("--num-layers", type=int, default=2)
    a("--num-heads", type=int, default=3)
    a("--num-kv-heads", type=int, default=1)
    a("--intermediate-size", type=int, default=512)
    a("--embed-init", choices=("pca", "random"), default="pca",
      help="pca: the target's output embedding on its top principal directions")
    add_loop_arguments(parser, Config("", "", ""))
    a("--seq-len", type=int, default=256)
    a("--answer-context", type=int, default=64,
      help="start each training window this many tokens before the answer (-1: at the prompt)")
    a("--ce-weight", type=float, default=0.0, help="mix in CE on the data tokens (0..1)")
    a("--teacher-top-k", type=int, default=32, help="teacher probabilities kept per position")


def config_from_args(args, target: str) -> Config:
    return Config(target, args.data, args.output, hidden_size=args.hidden_size,
                  num_layers=args.num_layers, num_heads=args.num_heads,
                  num_kv_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
                  embed_init=args.embed_init, seq_len=args.seq_len,
                  answer_context=None if args.answer_context < 0 else args.answer_context,
                  ce_weight=args.ce_weight, teacher_top_k=args.teacher_top_k,
                  **loop_settings(args))


def draft_config(target_cfg, cfg: Config) -> dict:
    """A LlamaForCausalLM config with the target's vocabulary, special ids and RoPE."""
    t = target_cfg
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads}, "
                         f"num_kv_heads {cfg.num_kv_heads}: heads must divide evenly")
    if cfg.hidden_size > t.hidden_size:
        raise ValueError(f"hidden_size {cfg.hidden_size} exceeds the target's {t.hidden_size}")
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": t.vocab_size, "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "head_dim": cfg.hidden_size // cfg.num_heads, "hidden_act": "silu",
           "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
           "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
           "pad_token_id": t.pad_token_id}
    rope = getattr(t, "rope_parameters", None)
    theta = getattr(t, "rope_theta", 10000.0)
    out["rope_parameters"] = dict(rope) if rope else {"rope_theta": theta, "rope_type": "default"}
    return out


def principal_directions(weight: torch.Tensor, k: int) -> torch.Tensor:
    """weight [vocab, H] -> P [H, k]: the top-k right singular vectors (E @ P keeps most of E)."""
    w = weight.double()
    vals, vecs = torch.linalg.eigh(w.T @ w)  # ascending eigenvalues
    return vecs[:, torch.argsort(vals, descending=True)[:k]].float()


def build_draft(dcfg: dict, teacher_weight: torch.Tensor, embed_init: str, seed: int):
    """teacher_weight [vocab, H_target].  Returns a float32 LlamaForCausalLM.
    "pca": the embedding is W @ P rescaled to HF's init std.  Kept small on purpose: at full
    scale the tied embedding makes the fresh draft predict its input token again with high
    confidence (KL ~46 nats at step 0 on SmolLM2 data, vs ~9 for a small init)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(**dcfg)
    model = LlamaForCausalLM(config).float()
    if embed_init == "pca":
        e = teacher_weight.float() @ principal_directions(teacher_weight, dcfg["hidden_size"])
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(e * (config.initializer_range / e.std()))
    elif embed_init != "random":
        raise ValueError(f"embed_init {embed_init!r}: use pca or random")
    return model


@torch.no_grad()
def teacher_sequences(seqs: list[Sequence], teacher_weight: torch.Tensor, top_k: int,
                      hidden_size: int, bf16: bool = True,
                      progress: bool = False) -> list[Sequence]:
    """Replace each sequence's features by its teacher's top-k next-token distribution, computed
    once: softmax(final @ W^T) over the full vocabulary, cut to the k most likely ids.  On a CPU
    the dense [tokens, vocab] teacher costs more per step than the draft itself.
    Packed as hidden [n - 1, 2k] float32 = cat(ids, probs) (ids < 2^24 are exact in float32),
    so eagle3_train.collate cuts windows of it exactly as it cuts features."""
    from tqdm import tqdm
    out = []
    w = teacher_weight.to(torch.bfloat16 if bf16 else torch.float32)
    for s in tqdm(seqs, desc="teacher", unit="seq", disable=not progress, dynamic_ncols=True):
        final = s.hidden[:, -hidden_size:].to(w.dtype)  # the last block: final normed hidden
        probs = torch.softmax((final @ w.T).float(), dim=-1)
        top = probs.topk(top_k, dim=-1)
        packed = torch.cat([top.indices.float(), top.values], dim=-1)
        out.append(Sequence(s.tokens, packed, s.prompt_len))
    return out


def windows(seqs: list[Sequence], seq_len: int, answer_context: int | None) -> dict:
    """tokens [B, L], teacher_ids [B, L - 1, k], teacher_probs [B, L - 1, k], lengths [B]."""
    k = seqs[0].hidden.shape[1] // 2
    batch = collate(seqs, seq_len, k, answer_context)
    return {"tokens": batch["tokens"], "teacher_ids": batch["aux"].long(),
            "teacher_probs": batch["final"], "lengths": batch["lengths"]}


def distill_loss(model, batch: dict, ce_weight: float) -> tuple[torch.Tensor, dict]:
    """Soft CE to the top-k teacher (+ ce_weight x CE on the data tokens), over real positions.
    Written with one logsumexp over the vocabulary instead of a dense log_softmax:
    -sum_k p_k log q_k = (sum_k p_k) * lse(z) - sum_k p_k z_k."""
    tokens, n = batch["tokens"], batch["lengths"]
    ids, probs = batch["teacher_ids"], batch["teacher_probs"]  # [B, L - 1, k]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [B, L - 1]
    # right padding needs no attention mask: causal attention never looks ahead to it
    valid = torch.arange(inputs.shape[1])[None, :] < (n - 1)[:, None]
    logits = model(input_ids=inputs).logits.float()  # [B, L - 1, V]
    lse = torch.logsumexp(logits, dim=-1)  # [B, L - 1]
    picked = logits.gather(-1, ids)  # [B, L - 1, k]
    soft = probs.sum(-1) * lse - (probs * picked).sum(-1)
    hard = lse - logits.gather(-1, labels[..., None])[..., 0]
    count = valid.sum().clamp(min=1)
    loss = (((1 - ce_weight) * soft + ce_weight * hard) * valid).sum() / count
    with torch.no_grad():
        # KL over the teacher's top k (the rest of its mass is small and left out)
        kl = (probs * probs.clamp(min=1e-30).log()).sum(-1) + soft
        hit = (logits.argmax(-1) == ids[..., 0]) & valid
        metrics = {"kl": (kl * valid).sum() / count, "acc": hit.sum() / count}
    return loss, metrics


def _autocast_loss(model, batch, cfg: Config):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        return distill_loss(model, batch, cfg.ce_weight)


def train(cfg: Config) -> str:
    """Train (or resume) and export; returns the exported folder (= cfg.output)."""
    from ..models.loading import load_causal_lm
    if not 0.0 <= cfg.ce_weight <= 1.0:
        raise ValueError(f"--ce-weight {cfg.ce_weight} must be in 0..1")
    if cfg.teacher_top_k < 1:
        raise ValueError(f"--teacher-top-k {cfg.teacher_top_k} must be >= 1")
    target = load_causal_lm(cfg.target, torch.float32)
    tc = target.config
    seqs, meta = load_for_target(cfg.data, tc)
    teacher_weight = target.get_output_embeddings().weight.detach().float().clone()
    del target
    dcfg = draft_config(tc, cfg)
    model = build_draft(dcfg, teacher_weight, cfg.embed_init, cfg.seed)
    seqs = teacher_sequences(seqs, teacher_weight, cfg.teacher_top_k, tc.hidden_size,
                             cfg.bf16_autocast, cfg.progress)
    pick = batch_schedule(len(seqs), cfg.batch_size, cfg.seed)
    loop = LoopConfig(cfg.output, cfg.steps, cfg.lr, save_every=cfg.save_every,
                      max_minutes=cfg.max_minutes, stop_at=cfg.stop_at, progress=cfg.progress)
    reached = train_loop(model, lambda step: windows([seqs[i] for i in pick(step)], cfg.seq_len,
                                                     cfg.answer_context),
                         lambda m, batch: _autocast_loss(m, batch, cfg),
                         loop, extra={"config": dcfg, "embed_init": cfg.embed_init})
    info = {"trained_steps": reached, "data_tokens": meta["num_tokens"],
            "data_source": meta.get("source", "self"),
            "train_config": {k: v for k, v in asdict(cfg).items()
                             if k not in ("target", "data", "output", "progress")}}
    export_draft(model, cfg.target, cfg.output, info)
    return cfg.output


def export_draft(model, target: str, folder: str, info: dict, dtype=torch.bfloat16) -> None:
    """config.json + model.safetensors (tied: no lm_head key) + the target's tokenizer files.
    Everything is written to a temp folder first, then moved in file by file."""
    import copy
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        copy.deepcopy(model).to(dtype).save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = json.load(f)
        cfg["specplug_training"] = info
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        for name in TOKENIZER_FILES:
            src = os.path.join(target, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
