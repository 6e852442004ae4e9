"""`make demo`: SmolLM2-135M-Instruct on a handful of MT-Bench questions, embedded engine, with
and without speculation in the same process; prints tokens/s, speedup and tau, writes stats JSON.

    python -m specplug.demo [--num-prompts 6] [--max-new-tokens 128] [--dtype float32 ...]
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
    """(method, path, options) of the best trained drafter measured on SmolLM2, as named by
    assets/drafters/best.json (today: lookup + the EAGLE-3 head verified as one tree, see
    benchmarks/README.md), else n-gram prompt lookup."""
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


def run_pair(target: str, dtype: str, prompts: list[str], method: str, drafter: str | None,
             options: dict, args) -> dict:
    """Plain and speculative on the same prompts in one process -> the stats JSON of both."""
    model, tokenizer = load_target(target, dtype)
    print(f"\n== {dtype}: SmolLM2-135M-Instruct, {torch.get_num_threads()} thread(s); "
          f"drafter {method}{' ' + drafter if drafter else ''}; {len(prompts)} MT-Bench questions")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    reqs = [Request(tokenizer.encode(t, add_special_tokens=False), args.max_new_tokens, prompt=p)
            for t, p in zip(texts, prompts)]
    runs = {}
    for label, meth in (("plain", "none"), ("speculative", method)):
        cfg = GenerateConfig(target=target, prompts=prompts, method=meth,
                             drafter=drafter if meth != "none" else None, gamma=args.gamma,
                             max_new_tokens=args.max_new_tokens, chat_template=True,
                             dtype=dtype, options=options if meth != "none" else {})
        outputs, stats = build_embedded(cfg, model, tokenizer).generate(reqs)
        print(stats.summary_line(label))
        runs[label] = (cfg, outputs, stats)
    plain, spec = runs["plain"][2], runs["speculative"][2]
    same = sum(a.output_token_ids == b.output_token_ids
               for a, b in zip(runs["plain"][1], runs["speculative"][1]))
    speedup = spec.tokens_per_second / plain.tokens_per_second if plain.tokens_per_second else 0.0
    print(f"plain {plain.tokens_per_second:.1f} tok/s | {method} {spec.tokens_per_second:.1f} "
          f"tok/s | speedup {speedup:.2f}x | tau {spec.mean_accept_length:.2f} | "
          f"outputs identical to plain: {same}/{len(prompts)}")
    if same < len(prompts) and dtype == "bfloat16":
        print("(bf16 rounds a token differently as row k of a multi-token matmul than alone, so "
              "plain and speculative bf16 part ways at near-ties; float32 above is the check)")
    payload = {label: stats_json(cfg, outs, st) for label, (cfg, outs, st) in runs.items()}
    payload.update(speedup=round(speedup, 4), identical_outputs=same,
                   first_answer=runs["speculative"][1][0].output_text)
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specplug-demo")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    # float32 shows bit-identical output; bf16 is where verification is cheap on CPU
    # (6 tokens cost ~1.1x one decode step with AVX-512 BF16, ~1.5x in fp32)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                    help="repeatable; default: float32 then bfloat16")
    ap.add_argument("--method", help="drafter method (default: the best shipped, see best_drafter)")
    ap.add_argument("--drafter", help="drafter folder for --method (e.g. the shipped EAGLE-3 head)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (benchmarks use 1)")
    ap.add_argument("--output", default="out/demo_stats.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    target = prepare("smollm2")
    prompts = [it.turns[0] for it in load_prompts("mtbench", args.num_prompts)]
    method, drafter, options = best_drafter()
    if args.method:
        method, drafter, options = args.method, args.drafter, {}
    payload = {dtype: run_pair(target, dtype, prompts, method, drafter, options, args)
               for dtype in args.dtype or ["float32", "bfloat16"]}
    first = next(iter(payload.values()))["first_answer"]
    print("\nfirst answer:\n" + first[:400])
    payload["environment"] = environment()
    write_stats(args.output, payload)
    print(f"\nstats written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
