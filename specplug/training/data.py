"""Training data for drafters: prompts answered by the target itself, with its hidden states.

The target generates through the embedded engine; a `FeatureRecorder` rides along as a drafter
that never drafts but declares `needs.hidden_layers`, so the engine hands it exactly the features
it would hand a real head at inference time (same code path, same dtype).

Layout of a data folder:
  meta.json            {"target", "hidden_layers" (HF hidden_states indices), "hidden_size",
                        "dtype", "prompts_per_chunk", "chunks": [names...], "num_tokens"}
  chunk_00000.safetensors
      tokens   [N] int64      sequences concatenated (prompt + answer)
      offsets  [S + 1] int64  sequence s is tokens[offsets[s]:offsets[s + 1]]
      prompt_lens [S] int64
      hidden   [N - S, len(hidden_layers) * H]  per sequence: features of positions 0 .. n - 2
               (position p's features come from the target having read x_0..x_p; the last
               token has none, as it predicts nothing we know)
Each chunk holds the answers to prompts [i * prompts_per_chunk, (i + 1) * prompts_per_chunk) of
the prompt list, and is written atomically, so a killed run resumes at the first missing chunk.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..drafters.base import Drafter
from ..types import DraftInput, DraftProposal, DrafterNeeds

# EAGLE-3 default aux layers for a 30-layer target ([2, L // 2, L - 3]) plus the final normed
# hidden (-1 resolved to L), whose lm_head gives the teacher distribution for distillation.
def default_hidden_layers(num_layers: int) -> tuple[int, ...]:
    return (2, num_layers // 2, num_layers - 3, num_layers)


class FeatureRecorder(Drafter):
    """A drafter that proposes nothing and keeps the target features handed to it, per row."""

    def __init__(self, hidden_layers: tuple[int, ...]):
        self.needs = DrafterNeeds(hidden_layers=tuple(hidden_layers))
        self.features: dict[int, list[torch.Tensor]] = {}

    def propose(self, inp: DraftInput) -> DraftProposal:
        for r, rid in enumerate(inp.row_ids):
            feats = inp.hidden_states[r] if inp.hidden_states else None
            if feats is not None and feats.shape[0]:
                self.features.setdefault(rid, []).append(feats.clone())
        return DraftProposal.empty(len(inp.row_ids))

    def take(self, rid: int) -> torch.Tensor | None:
        parts = self.features.pop(rid, [])
        return torch.cat(parts) if parts else None


@dataclass
class DataConfig:
    target: str
    output: str
    num_prompts: int = 512
    prompts_per_chunk: int = 16
    batch_size: int = 16
    max_prompt_tokens: int = 256
    max_new_tokens: int = 192
    dtype: str = "bfloat16"
    suite: str = "sharegpt"
    skip_prompts: int = 0  # leave the first prompts out (e.g. kept for evaluation)
    # "self": the target answers each prompt (decoding through the embedded engine);
    # "reference": the target reads prompt + the dataset's own answer in one prefill pass.
    # On a shared CPU prefill is ~10x cheaper per token, and the teacher distribution (from the
    # saved final hidden state) is exact either way; only the text differs from the target's own.
    source: str = "self"
    max_len: int = 320  # reference mode: prompt + answer tokens kept
    prompt_ids: list[list[int]] | None = None  # self mode: these prompts instead of the suite's


def chat_prompts(tokenizer, suite: str, count: int, max_tokens: int, skip: int = 0) -> list[list[int]]:
    """First-turn prompts of a suite, chat-templated; over-long ones are skipped (not cut: a cut
    prompt reads unlike anything the model will see)."""
    from ..datasets import load_prompts
    out: list[list[int]] = []
    # over-read: some prompts are too long or empty
    items = load_prompts(suite, (count + skip) * 3)
    for item in items[skip:]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": item.turns[0]}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if 4 <= len(ids) <= max_tokens:
            out.append(ids)
        if len(out) >= count:
            break
    return out


def reference_sequences(tokenizer, suite: str, count: int, max_prompt: int, max_len: int,
                        skip: int = 0) -> list[tuple[list[int], int]]:
    """(prompt + first answer, prompt_len) for the first `count` usable ShareGPT conversations."""
    from ..datasets import iter_json_array, package_file
    if suite != "sharegpt":
        raise ValueError(f"reference answers need the sharegpt suite, got {suite!r}")
    out, seen = [], 0
    for conv in iter_json_array(package_file(suite)):
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        user, answer = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
        if not user or not answer:
            continue
        seen += 1
        if seen <= skip:
            continue
        msgs = [{"role": "user", "content": user}]
        prompt = tokenizer.encode(tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        if not 4 <= len(prompt) <= max_prompt:
            continue
        full = tokenizer.encode(tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": answer}], tokenize=False),
            add_special_tokens=False)
        out.append((full[:max_len], len(prompt)))
        if len(out) >= count:
            break
    return out


def generate_data(cfg: DataConfig, progress: bool = True) -> dict:
    """Generate (or resume) a data folder; returns its meta."""
    if cfg.source == "reference":
        return prefill_data(cfg, progress)
    if cfg.source != "self":
        raise ValueError(f"data source {cfg.source!r}: use self or reference")
    from ..engine.embedded import EmbeddedEngine
    from ..engine.rows import Request
    from ..models.loading import load_causal_lm, load_tokenizer
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    model = load_causal_lm(cfg.target, dtype)
    tokenizer = load_tokenizer(cfg.target)
    layers = default_hidden_layers(model.config.num_hidden_layers)
    meta = _open_meta(cfg, model.config, layers)
    prompts = cfg.prompt_ids or chat_prompts(tokenizer, cfg.suite, cfg.num_prompts,
                                             cfg.max_prompt_tokens, cfg.skip_prompts)
    n_chunks = (len(prompts) + cfg.prompts_per_chunk - 1) // cfg.prompts_per_chunk
    bar = _bar(n_chunks, progress, initial=len(meta["chunks"]))
    for c in range(len(meta["chunks"]), n_chunks):
        group = prompts[c * cfg.prompts_per_chunk:(c + 1) * cfg.prompts_per_chunk]
        recorder = FeatureRecorder(layers)
        engine = EmbeddedEngine(model, tokenizer, recorder, num_draft_tokens=1)
        outputs, _ = engine.generate([Request(p, cfg.max_new_tokens) for p in group],
                                     batch_size=cfg.batch_size)
        seqs = []
        for rid, (prompt, out) in enumerate(zip(group, outputs)):  # a fresh engine: ids 0..n-1
            feats = recorder.take(rid)
            seqs.append((prompt + out.output_token_ids, len(prompt), feats))
        name = write_chunk(cfg.output, c, seqs)
        meta["chunks"].append(name)
        meta["num_tokens"] += sum(min(len(t), f.shape[0] + 1) for t, _, f in seqs if f is not None)
        _write_json(os.path.join(cfg.output, "meta.json"), meta)
        bar.update(1)
        bar.set_postfix(tokens=meta["num_tokens"])
    bar.close()
    return meta


@torch.inference_mode()
def prefill_data(cfg: DataConfig, progress: bool = True) -> dict:
    """Reference mode: one batched forward per group over prompt + dataset answer."""
    from ..models.loading import load_causal_lm, load_tokenizer
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    model = load_causal_lm(cfg.target, dtype)
    tokenizer = load_tokenizer(cfg.target)
    layers = default_hidden_layers(model.config.num_hidden_layers)
    meta = _open_meta(cfg, model.config, layers)
    pairs = reference_sequences(tokenizer, cfg.suite, cfg.num_prompts, cfg.max_prompt_tokens,
                                cfg.max_len, cfg.skip_prompts)
    n_chunks = (len(pairs) + cfg.prompts_per_chunk - 1) // cfg.prompts_per_chunk
    bar = _bar(n_chunks, progress, initial=len(meta["chunks"]))
    for c in range(len(meta["chunks"]), n_chunks):
        group = pairs[c * cfg.prompts_per_chunk:(c + 1) * cfg.prompts_per_chunk]
        seqs = []
        for i in range(0, len(group), cfg.batch_size):
            batch = group[i:i + cfg.batch_size]
            width = max(len(t) for t, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, (toks, _) in enumerate(batch):  # right padding: real positions keep 0..n-1
                ids[r, :len(toks)] = torch.tensor(toks)
                mask[r, :len(toks)] = 1
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            feats = torch.cat([out.hidden_states[j] for j in layers], dim=-1)
            for r, (toks, plen) in enumerate(batch):
                seqs.append((toks, plen, feats[r, :len(toks) - 1].clone()))
        name = write_chunk(cfg.output, c, seqs)
        meta["chunks"].append(name)
        meta["num_tokens"] += sum(len(t) for t, _, _ in seqs)
        _write_json(os.path.join(cfg.output, "meta.json"), meta)
        bar.update(1)
        bar.set_postfix(tokens=meta["num_tokens"])
    bar.close()
    return meta


def write_chunk(folder: str, index: int, seqs: list[tuple[list[int], int, torch.Tensor | None]]) -> str:
    """seqs: (tokens, prompt_len, features [m, F]) per sequence; tokens are cut to m + 1 so every
    feature has its next token.  Written to a temp name, then renamed."""
    from safetensors.torch import save_file
    tokens, offsets, plens, hidden = [], [0], [], []
    for toks, plen, feats in seqs:
        if feats is None or feats.shape[0] < 2:
            continue
        m = min(feats.shape[0], len(toks) - 1)
        tokens += toks[:m + 1]
        offsets.append(len(tokens))
        plens.append(min(plen, m + 1))
        hidden.append(feats[:m])
    if not hidden:
        raise ValueError(f"chunk {index}: no sequence produced features")
    name = f"chunk_{index:05d}.safetensors"
    tmp = os.path.join(folder, f".{name}.tmp")
    save_file({"tokens": torch.tensor(tokens, dtype=torch.long),
               "offsets": torch.tensor(offsets, dtype=torch.long),
               "prompt_lens": torch.tensor(plens, dtype=torch.long),
               "hidden": torch.cat(hidden).contiguous()}, tmp)
    os.replace(tmp, os.path.join(folder, name))
    return name


@dataclass
class Sequence:
    tokens: torch.Tensor  # [n] int64
    hidden: torch.Tensor  # [n - 1, F]
    prompt_len: int


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: not a specplug training data folder "
                                f"(make one with `specplug train data`)")
    with open(path) as f:
        return json.load(f)


def load_sequences(folder: str, max_chunks: int | None = None) -> tuple[list[Sequence], dict]:
    """Every sequence of a data folder (chunks in order)."""
    from safetensors.torch import load_file
    meta = read_meta(folder)
    seqs: list[Sequence] = []
    for name in meta["chunks"][:max_chunks]:
        path = os.path.join(folder, name)
        try:
            d = load_file(path)
        except Exception as e:
            raise ValueError(f"{path}: unreadable chunk ({type(e).__name__}: {e})") from e
        missing = [k for k in ("tokens", "offsets", "prompt_lens", "hidden") if k not in d]
        if missing:
            raise ValueError(f"{path}: missing key {missing[0]}")
        off = d["offsets"].tolist()
        h0 = 0
        for s in range(len(off) - 1):
            n = off[s + 1] - off[s]
            seqs.append(Sequence(d["tokens"][off[s]:off[s + 1]], d["hidden"][h0:h0 + n - 1],
                                 int(d["prompt_lens"][s])))
            h0 += n - 1
        if h0 != d["hidden"].shape[0]:
            raise ValueError(f"{path}: hidden has {d['hidden'].shape[0]} rows, offsets imply {h0}")
    return seqs, meta


def _open_meta(cfg: DataConfig, config, layers) -> dict:
    os.makedirs(cfg.output, exist_ok=True)
    path = os.path.join(cfg.output, "meta.json")
    if os.path.isfile(path):
        meta = read_meta(cfg.output)
        if tuple(meta["hidden_layers"]) != tuple(layers) or meta["prompts_per_chunk"] != cfg.prompts_per_chunk:
            raise ValueError(f"{path}: existing data was made with other settings "
                             f"(hidden_layers {meta['hidden_layers']}, prompts_per_chunk "
                             f"{meta['prompts_per_chunk']}); use a new --output")
        # chunks named in meta but missing on disk are regenerated
        meta["chunks"] = [c for c in meta["chunks"] if os.path.isfile(os.path.join(cfg.output, c))]
        return meta
    meta = {"target": os.path.abspath(cfg.target), "hidden_layers": list(layers),
            "hidden_size": int(config.hidden_size), "num_layers": int(config.num_hidden_layers),
            "vocab_size": int(config.vocab_size), "dtype": cfg.dtype,
            "prompts_per_chunk": cfg.prompts_per_chunk, "suite": cfg.suite,
            "max_new_tokens": cfg.max_new_tokens, "source": cfg.source, "chunks": [],
            "num_tokens": 0}
    _write_json(path, meta)
    return meta


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _bar(total: int, enabled: bool, initial: int = 0, unit: str = "chunk"):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit=unit, disable=not enabled, dynamic_ncols=True)
