"""`make demo`: SmolLM2-135M-Instruct on a handful of MT-Bench questions, embedded engine, with
and without speculation in the same process; prints tokens/s, speedup and tau, writes stats JSON.

    python -m specplug.demo [--num-prompts 6] [--max-new-tokens 128] [--dtype bfloat16]
                            [--method hybrid --drafter specplug/assets/drafters/smollm2-eagle3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .api import GenerateConfig, build_embedded, environment, load_target, stats_json, write_stats
from .datasets import load_prompts
from .engine.rows import Request
from .models.prepare import prepare

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "drafters")


def best_drafter() -> tuple[str, str | None, dict]:
    """(method, path, options) of the fastest drafter measured on SmolLM2: a shipped trained one
    when assets/drafters/best.json names it, else n-gram prompt lookup.  (The shipped CPU-trained
    EAGLE-3 head raises tau but not speed yet: benchmarks/README.md.)"""
    manifest = os.path.join(ASSETS, "best.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            best = json.load(f)
        path = best.get("path")
        path = os.path.join(ASSETS, path) if path else None
        options = dict(best.get("options", {}))
        for key, value in list(options.items()):  # relative asset paths inside options
            if isinstance(value, str) and value.startswith("assets:"):
                options[key] = os.path.join(ASSETS, value[len("assets:"):])
        return best["method"], path, options
    return "ngram", None, {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specplug-demo")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    # bf16: verifying 6 tokens costs ~1.1x one decode step on AVX-512 CPUs (fp32: ~1.5x)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--method", help="drafter method (default: the best shipped, see best_drafter)")
    ap.add_argument("--drafter", help="drafter folder for --method (e.g. the shipped EAGLE-3 head)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--output", default="out/demo_stats.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    target = prepare("smollm2")
    model, tokenizer = load_target(target, args.dtype)
    items = load_prompts("mtbench", args.num_prompts)
    prompts = [it.turns[0] for it in items]
    method, drafter, options = best_drafter()
    if args.method:
        method, drafter, options = args.method, args.drafter, {}
    print(f"target: SmolLM2-135M-Instruct ({args.dtype}, {torch.get_num_threads()} threads); "
          f"drafter: {method}{' ' + drafter if drafter else ''}; {len(prompts)} MT-Bench questions")

    runs = {}
    for label, meth in (("plain", "none"), ("speculative", method)):
        cfg = GenerateConfig(target=target, prompts=prompts, method=meth,
                             drafter=drafter if meth != "none" else None, gamma=args.gamma,
                             max_new_tokens=args.max_new_tokens, chat_template=True,
                             dtype=args.dtype, options=options if meth != "none" else {})
        engine = build_embedded(cfg, model, tokenizer)
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
        reqs = [Request(tokenizer.encode(t, add_special_tokens=False), args.max_new_tokens,
                        prompt=p) for t, p in zip(ids, prompts)]
        outputs, stats = engine.generate(reqs)
        print(stats.summary_line(label))
        runs[label] = (cfg, outputs, stats)

    plain, spec = runs["plain"][2], runs["speculative"][2]
    same = [a.output_token_ids == b.output_token_ids
            for a, b in zip(runs["plain"][1], runs["speculative"][1])]
    speedup = spec.tokens_per_second / plain.tokens_per_second if plain.tokens_per_second else 0.0
    print(f"\nplain {plain.tokens_per_second:.1f} tok/s | {method} "
          f"{spec.tokens_per_second:.1f} tok/s | speedup {speedup:.2f}x | "
          f"tau {spec.mean_accept_length:.2f} | outputs identical: {sum(same)}/{len(same)}")
    if sum(same) < len(same) and args.dtype == "bfloat16":
        print("(bf16 rounds a token differently as row k of a multi-token matmul than alone, so "
              "plain and speculative bf16 part ways at near-ties; --dtype float32 is bit-identical)")
    print("\nfirst answer:\n" + runs["speculative"][1][0].output_text[:400])
    payload = {label: stats_json(cfg, outs, st) for label, (cfg, outs, st) in runs.items()}
    payload["speedup"] = round(speedup, 4)
    payload["identical_outputs"] = sum(same)
    payload["environment"] = environment()
    write_stats(args.output, payload)
    print(f"\nstats written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
