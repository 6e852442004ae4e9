"""Measure a trained drafter against plain decoding and lookup, in one process, back to back:
MT-Bench turn-1 prompts (never trained on), greedy, the embedded engine.  Writes one JSON with
each method's summary (tau, tokens/s, speedup vs plain of the same run) and whether its outputs
are identical to plain decoding."""
from __future__ import annotations

import json
import os
import time

import torch


def method_specs(head: str, head_method: str = "eagle3") -> dict:
    """name -> (method, path, options)."""
    return {
        "plain": (None, None, {}),
        "ngram": ("ngram", None, {"max_ngram": 3, "min_ngram": 1}),
        head_method: (head_method, head, {}),
        "hybrid": ("hybrid", head, {"head_method": head_method, "mode": "switch"}),
        "hybrid-tree": ("hybrid", head, {"head_method": head_method, "mode": "tree"}),
    }


def evaluate(target: str, head: str, output: str, num_prompts: int = 10, max_new_tokens: int = 96,
             gamma: int = 5, dtype: str = "float32", batch_size: int = 1,
             methods: tuple[str, ...] | None = None, suite: str = "mtbench") -> dict:
    from ..datasets import load_prompts
    from ..drafters.base import DrafterSpec, build_drafter
    from ..engine.embedded import EmbeddedEngine
    from ..engine.rows import Request
    from ..models.loading import load_causal_lm, load_tokenizer, target_info
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    model, tok = load_causal_lm(target, torch_dtype), load_tokenizer(target)
    items = load_prompts(suite, num_prompts)
    reqs = []
    for item in items:
        text = item.turns[0]
        if item.chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        reqs.append(Request(tok.encode(text, add_special_tokens=False), max_new_tokens))
    specs = method_specs(head)
    names = list(methods or specs)
    results, plain_ids = {}, None
    for name in names:
        method, path, options = specs[name]
        drafter = None if method is None else build_drafter(DrafterSpec(method, path, options),
                                                            target_info(model, tok))
        engine = EmbeddedEngine(model, tok, drafter, gamma)
        start = time.perf_counter()
        outs, stats = engine.generate(reqs, batch_size=batch_size)
        row = stats.summary()
        row["wall_s"] = round(time.perf_counter() - start, 2)
        ids = [o.output_token_ids for o in outs]
        if name == "plain":
            plain_ids = ids
        if plain_ids is not None:
            row["identical_to_plain"] = sum(a == b for a, b in zip(ids, plain_ids)) / len(ids)
        if hasattr(drafter, "used_lookup"):
            row["hybrid_steps"] = {"lookup": drafter.used_lookup, "head": drafter.used_head}
        results[name] = row
        print(f"{name:12s} tau={row['mean_accept_length']:.3f} tok/s={row['tokens_per_second']:.2f}",
              flush=True)
    base = results.get("plain", {}).get("tokens_per_second")
    for row in results.values():
        if base:
            row["speedup_vs_plain"] = round(row["tokens_per_second"] / base, 3)
    payload = {"target": target, "head": head, "suite": f"{suite} turn 1", "num_prompts": len(reqs),
               "max_new_tokens": max_new_tokens, "gamma": gamma, "dtype": dtype,
               "batch_size": batch_size, "threads": torch.get_num_threads(),
               "temperature": 0.0, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(payload, f, indent=1)
    return payload
