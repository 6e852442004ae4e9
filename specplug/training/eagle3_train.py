"""Train an EAGLE-3 head on a data folder of target features (see data.py); export it in the
SpecForge/SafeAILab layout that specplug.drafters.eagle3 (and vLLM/SGLang) load.

The trained module IS `specplug.drafters.eagle3.Eagle3Head`, run through the same SlotCache
attention as at inference, so what trains is what drafts.  Training unrolls `ttt_steps`
drafting steps (EAGLE-3's training-time test): for entry e (token x_{e+1} at position e + 1,
target feature g_e),
  step 0   reads (x_{e+1}, fc(g_e)), attends to step-0 entries e' <= e  -> predicts x_{e+2}
  step k   reads (x_{e+1+k}, out_{k-1}[e]) at position e + 1 + k, attends to step-0 entries
           e' <= e and to its own earlier steps (the diagonal)           -> predicts x_{e+2+k}
exactly the keys a draft chain sees.  Loss: cross-entropy against the target's own distribution
(softmax of the target's lm_head over the saved final hidden state), restricted to the draft
vocabulary, weighted 0.8^k over steps.

Reduced draft vocabulary: the `draft_vocab` most frequent tokens of the data (EOS always in),
stored as d2t offsets (target_id = i + d2t[i]) and a t2d mask.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from ..drafters.eagle3 import Eagle3Head
from ..engine.kv import SlotCache
from .data import Sequence, load_sequences
from .trainer import LoopConfig, train_loop

STEP_DECAY = 0.8


@dataclass
class Eagle3TrainConfig:
    target: str
    data: str
    output: str
    draft_vocab: int = 8192
    steps: int = 600
    stop_at: int | None = None  # stop early at this step (the lr schedule still spans `steps`)
    batch_size: int = 4  # sequences per step
    seq_len: int = 320  # tokens kept per sequence (from its start)
    ttt_steps: int = 3
    answer_context: int | None = None  # start windows this many tokens before the answer
    lr: float = 1e-3
    seed: int = 0
    bf16_autocast: bool = True  # ~1.5x faster on AVX-512 BF16 CPUs; weights stay float32
    save_every: int = 100
    max_minutes: float | None = None
    progress: bool = True


def frequency_vocab(seqs: list[Sequence], vocab_size: int, draft_vocab: int,
                    always: tuple[int, ...] = ()) -> torch.Tensor:
    """[draft_vocab] ascending target ids: the most frequent tokens (ties: lower id first)."""
    if not 1 <= draft_vocab <= vocab_size:
        raise ValueError(f"--draft-vocab {draft_vocab} must be in 1..{vocab_size}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(s.tokens, minlength=vocab_size)[:vocab_size]
    counts[list(always)] = counts.max() + 1
    # stable sort on -count keeps lower ids first among ties
    order = torch.sort(-counts, stable=True).indices[:draft_vocab]
    return order.sort().values


def head_config(target_cfg, draft_vocab: int, aux_ids: list[int]) -> dict:
    c = target_cfg
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": 1, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads,
           "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
           "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
           "vocab_size": c.vocab_size, "draft_vocab_size": draft_vocab, "hidden_act": "silu",
           "target_hidden_size": c.hidden_size, "tie_word_embeddings": False,
           "norm_before_residual": False, "eagle_aux_hidden_state_layer_ids": list(aux_ids),
           "torch_dtype": "bfloat16"}
    rope = getattr(c, "rope_parameters", None)
    if rope:
        cfg["rope_parameters"] = dict(rope)
        cfg["rope_theta"] = rope.get("rope_theta")
    else:
        cfg["rope_theta"] = getattr(c, "rope_theta", 10000.0)
    return cfg


def build_head(cfg: dict, target, draft_ids: torch.Tensor, seed: int) -> Eagle3Head:
    """A fresh head; lm_head and norm start from the target's (rows of the draft vocabulary),
    so step 0 starts as 'predict the target's final hidden state'."""
    torch.manual_seed(seed)
    h = cfg["hidden_size"]
    n_aux = len(cfg["eagle_aux_hidden_state_layer_ids"])
    head = Eagle3Head(cfg, n_aux * h, h, False, len(draft_ids), None, cfg["norm_before_residual"])
    with torch.no_grad():
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[draft_ids].float())
        head.norm.weight.copy_(target.model.norm.weight.float())
    # the target's embedding, frozen and kept out of the head's state dict
    embed = target.get_input_embeddings()
    embed.weight.requires_grad_(False)
    object.__setattr__(head, "embed", embed)
    return head.float()


def collate(seqs: list[Sequence], seq_len: int, aux_width: int, answer_context: int | None = None) -> dict:
    """Pad sequences cut to seq_len: tokens [B, L], aux [B, L - 1, aux_width],
    final [B, L - 1, H], lengths [B].  With answer_context set, each window starts that many
    tokens before the answer instead of at the prompt's start: drafting only ever happens in
    answers, and RoPE attention depends on relative positions only, so the shift is harmless."""
    cut = []
    for s in seqs:
        start = 0 if answer_context is None else max(0, s.prompt_len - answer_context)
        start = min(start, max(0, len(s.tokens) - seq_len))
        end = start + seq_len
        cut.append(Sequence(s.tokens[start:end], s.hidden[start:end - 1], s.prompt_len - start))
    seqs = cut
    L = max(len(s.tokens) for s in seqs)
    feat = seqs[0].hidden.shape[1]
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    hidden = torch.zeros(len(seqs), L - 1, feat, dtype=torch.float32)
    for r, s in enumerate(seqs):
        tokens[r, :len(s.tokens)] = s.tokens
        hidden[r, :len(s.tokens) - 1] = s.hidden.float()
    return {"tokens": tokens, "aux": hidden[..., :aux_width], "final": hidden[..., aux_width:],
            "lengths": torch.tensor([len(s.tokens) for s in seqs])}


def unrolled_loss(head: Eagle3Head, batch: dict, teacher_weight: torch.Tensor,
                  ttt_steps: int) -> tuple[torch.Tensor, dict]:
    """teacher_weight [draft_vocab, H]: the target's lm_head rows of the draft vocabulary."""
    tokens, aux, final, n = batch["tokens"], batch["aux"], batch["final"], batch["lengths"]
    b, E = aux.shape[:2]  # entries e = 0 .. E - 1
    e = torch.arange(E)
    padded = torch.cat([tokens, tokens.new_zeros(b, ttt_steps)], 1)
    final = torch.cat([final, final.new_zeros(b, ttt_steps, final.shape[-1])], 1)
    real0 = e[None, :] < (n - 1)[:, None]  # [b, E] entries that exist
    causal = torch.ones(E, E, dtype=torch.bool).tril()[None] & real0[:, None, :]
    eye = torch.eye(E, dtype=torch.bool).expand(b, E, E)
    kv = SlotCache(b, device=aux.device)
    feats, total, weight_sum, metrics = aux, 0.0, 0.0, {}
    for k in range(ttt_steps):
        tok = padded[:, 1 + k:1 + k + E]
        pos = (e + 1 + k).expand(b, E)
        mask = torch.cat([causal] + [eye] * k, dim=2) if k else causal | eye
        kv.reserve(pos)
        out, logits = head(tok, feats, pos, kv, mask, k == 0)
        with torch.no_grad():
            teacher = torch.softmax(final[:, k + 1:k + 1 + E] @ teacher_weight.T, dim=-1)
        valid = (e[None, :] + 1 + k) <= (n - 2)[:, None]  # the label's feature exists
        logp = torch.log_softmax(logits.float(), dim=-1)
        ce = -(teacher * logp).sum(-1)
        count = valid.sum().clamp(min=1)
        loss_k = (ce * valid).sum() / count
        w = STEP_DECAY ** k
        total, weight_sum = total + w * loss_k, weight_sum + w
        hit = (logits.argmax(-1) == teacher.argmax(-1)) & valid
        metrics[f"acc{k}"] = hit.sum() / count
        feats = out
    return total / weight_sum, metrics


def _autocast_loss(head, batch, teacher_weight, cfg: Eagle3TrainConfig):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        return unrolled_loss(head, batch, teacher_weight, cfg.ttt_steps)


def batch_schedule(num_seqs: int, batch_size: int, seed: int):
    """step -> sequence indices: a fresh seeded permutation per epoch (pure in step)."""
    cache: dict[int, torch.Tensor] = {}

    def indices(step: int) -> list[int]:
        out = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, k = divmod(i, num_seqs)
            if epoch not in cache:
                cache.clear()
                cache[epoch] = torch.randperm(num_seqs, generator=torch.Generator().manual_seed(seed + epoch))
            out.append(int(cache[epoch][k]))
        return out
    return indices


def split_data_arg(item: str) -> tuple[str, int | None]:
    """'DIR' or 'DIR@N' (its first N chunks: a recipe pins its data while the folder grows)."""
    folder, at, count = item.rpartition("@")
    if not at:
        return item, None
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--data {item!r}: expected DIR or DIR@N with N >= 1 chunks")
    return folder, int(count)


def load_all(data: str) -> tuple[list[Sequence], dict]:
    """One data folder, or several separated by commas (made with the same hidden layers);
    DIR@N reads only the first N chunks of DIR."""
    seqs, meta = [], None
    for item in [d for d in data.split(",") if d]:
        folder, max_chunks = split_data_arg(item)
        more, m = load_sequences(folder, max_chunks)
        if max_chunks is not None and len(m["chunks"]) < max_chunks:
            raise ValueError(f"{folder}: has {len(m['chunks'])} chunks, {item} asks for {max_chunks}")
        if max_chunks is not None:
            m = {**m, "num_tokens": sum(len(s.tokens) for s in more)}
        if meta is not None and m["hidden_layers"] != meta["hidden_layers"]:
            raise ValueError(f"{folder}: hidden_layers {m['hidden_layers']} differ from "
                             f"{meta['hidden_layers']} of the first data folder")
        meta = m if meta is None else {**meta, "num_tokens": meta["num_tokens"] + m["num_tokens"],
                                       "source": f"{meta.get('source')}+{m.get('source')}"}
        seqs += more
    if meta is None:
        raise ValueError("--data names no folder")
    return seqs, meta


def load_for_target(data: str, target_cfg) -> tuple[list[Sequence], dict]:
    """load_all(data), checked against the target config it will train for (its hidden size,
    layer count and vocabulary), with at least one sequence."""
    seqs, meta = load_all(data)
    t = target_cfg
    if (meta["hidden_size"] != t.hidden_size or meta["hidden_layers"][-1] != t.num_hidden_layers
            or meta.get("vocab_size", t.vocab_size) != t.vocab_size):
        raise ValueError(f"{data}: data was made for another target (hidden {meta['hidden_size']}, "
                         f"layers {meta['hidden_layers']}, vocab {meta.get('vocab_size')}) than "
                         f"this one (hidden {t.hidden_size}, {t.num_hidden_layers} layers, "
                         f"vocab {t.vocab_size})")
    if not seqs:
        raise ValueError(f"{data}: no sequences")
    return seqs, meta


def train_eagle3(cfg: Eagle3TrainConfig) -> str:
    """Train (or resume) and export; returns the exported head folder (= cfg.output)."""
    from ..models.loading import load_causal_lm
    target = load_causal_lm(cfg.target, torch.float32)
    tc = target.config
    seqs, meta = load_for_target(cfg.data, tc)
    layers = meta["hidden_layers"]
    aux_ids = layers[:-1]  # the last saved layer is the final normed hidden: the teacher
    eos = [i for i in (tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id])
           if i is not None]
    draft_ids = frequency_vocab(seqs, tc.vocab_size, cfg.draft_vocab, tuple(eos))
    hcfg = head_config(tc, len(draft_ids), aux_ids)
    head = build_head(hcfg, target, draft_ids, cfg.seed)
    teacher_weight = target.get_output_embeddings().weight[draft_ids].detach().float()
    aux_width = len(aux_ids) * tc.hidden_size
    pick = batch_schedule(len(seqs), cfg.batch_size, cfg.seed)
    loop = LoopConfig(cfg.output, cfg.steps, cfg.lr, save_every=cfg.save_every,
                      max_minutes=cfg.max_minutes, stop_at=cfg.stop_at, progress=cfg.progress)
    reached = train_loop(head, lambda step: collate([seqs[i] for i in pick(step)], cfg.seq_len,
                                                    aux_width, cfg.answer_context),
                         lambda model, batch: _autocast_loss(model, batch, teacher_weight, cfg),
                         loop, extra={"draft_ids": draft_ids, "config": hcfg})
    export_eagle3(head, hcfg, draft_ids, tc.vocab_size, cfg.output,
                  {"trained_steps": reached, "data_tokens": meta["num_tokens"],
                   "train_config": {k: v for k, v in asdict(cfg).items()
                                    if k not in ("target", "data", "output", "progress")},
                   "data_source": meta.get("source", "self")})
    return cfg.output


def export_eagle3(head: Eagle3Head, cfg: dict, draft_ids: torch.Tensor, vocab_size: int,
                  folder: str, info: dict, dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json + model.safetensors (midlayer.*, fc, norm, lm_head, d2t, t2d), no embedding."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in head.state_dict().items()
             if not k.startswith(("embed.", "rope."))}
    state["d2t"] = (draft_ids - torch.arange(len(draft_ids))).long()
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    state["t2d"] = t2d
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**cfg, "specplug_training": info}, f, indent=1)
