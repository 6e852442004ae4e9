"""Which target layers carry what a drafter needs (seed 001): per layer,
  cosine   mean cosine similarity of the layer's hidden state, passed through the final norm,
           to the final one (per token);
  ce       early-exit cross-entropy: the target's own final norm + lm_head applied to the layer,
           scored against the next token of the text;
  top1     how often that early exit's argmax equals the final layer's argmax.
Layers index HF `hidden_states` (0 = embeddings, L = final, after the final norm), the same
indices EAGLE-3's aux layers use.  Written as layer_stats.json and layer_stats.png.
"""
from __future__ import annotations

import json
import os

import torch


@torch.inference_mode()
def layer_stats(model, sequences: list[list[int]]) -> dict:
    """sequences: token id lists (each >= 2 tokens)."""
    num_layers = model.config.num_hidden_layers
    norm, lm_head = model.model.norm, model.get_output_embeddings()
    cos = torch.zeros(num_layers + 1, dtype=torch.float64)
    ce = torch.zeros(num_layers + 1, dtype=torch.float64)
    top1 = torch.zeros(num_layers + 1, dtype=torch.float64)
    count = 0
    for seq in sequences:
        if len(seq) < 2:
            continue
        ids = torch.tensor([seq])
        hidden = model(ids, output_hidden_states=True).hidden_states  # L + 1 x [1, n, H]
        final = hidden[num_layers][0, :-1].double()
        final_top = lm_head(hidden[num_layers][0, :-1]).argmax(-1)
        labels = ids[0, 1:]
        for i in range(num_layers + 1):
            # the last entry is already normed; earlier ones get the final norm, as an exit
            # would (comparing raw residuals to the normed final mostly measures the norm's
            # per-dimension weights, not the layer)
            h = hidden[i][0, :-1]
            h = h if i == num_layers else norm(h)
            cos[i] += torch.nn.functional.cosine_similarity(h.double(), final, dim=-1).sum()
            logits = lm_head(h).double()
            ce[i] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            top1[i] += (logits.argmax(-1) == final_top).double().sum()
        count += len(seq) - 1
    if count == 0:
        raise ValueError("layer stats need at least one sequence of 2+ tokens")
    return {"layers": list(range(num_layers + 1)), "num_tokens": count,
            "cosine_to_final": (cos / count).tolist(), "early_exit_ce": (ce / count).tolist(),
            "early_exit_top1_agreement": (top1 / count).tolist()}


def plot_layer_stats(stats: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = stats["layers"]
    for ax, key, title in zip(axes, ("cosine_to_final", "early_exit_ce", "early_exit_top1_agreement"),
                              ("cosine to final hidden", "early-exit CE (nats)", "early-exit top-1 = final")):
        ax.plot(x, stats[key], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("hidden_states index")
        ax.grid(alpha=0.3)
    fig.suptitle(f"layer stats over {stats['num_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_layer_stats(target: str, output: str, suite: str = "mtbench", data: str | None = None,
                    num_prompts: int = 16, max_len: int = 256) -> str:
    from ..models.loading import load_causal_lm, load_tokenizer
    model = load_causal_lm(target, torch.float32)
    if data:
        from .data import load_sequences
        seqs = [s.tokens[:max_len].tolist() for s in load_sequences(data)[0][:num_prompts]]
    else:
        from ..datasets import load_prompts
        tok = load_tokenizer(target)
        seqs = []
        for item in load_prompts(suite, num_prompts):
            text = tok.apply_chat_template([{"role": "user", "content": item.turns[0]}],
                                           tokenize=False, add_generation_prompt=True) \
                if item.chat and tok.chat_template else item.turns[0]
            seqs.append(tok.encode(text, add_special_tokens=False)[:max_len])
    stats = layer_stats(model, seqs)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "layer_stats.json")
    with open(path, "w") as f:
        json.dump({"target": target, **stats}, f, indent=1)
    plot_layer_stats(stats, os.path.join(output, "layer_stats.png"))
    return path
