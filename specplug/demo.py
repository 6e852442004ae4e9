"""`make demo`: SmolLM2-135M-Instruct on a handful of MT-Bench questions, embedded engine, with
and without speculation taking turns in the same process (the benchmark runner: warm-up, then 3
repetitions); prints tokens/s, the speedup with its spread and tau, writes the bench JSON.

    python -m specplug.demo [--num-prompts 6] [--max-new-tokens 96] [--repeats 3]
                            [--dtype float32 ...]
                            [--method hybrid --drafter specplug/assets/drafters/smollm2-eagle3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .api import environment, write_stats
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


def run_pair(target: str, dtype: str, method: str, drafter: str | None, options: dict,
             args) -> dict:
    """Plain and speculative on the same MT-Bench questions, taking turns question by question,
    after a warm-up, repeated args.repeats times -> the bench JSON of the run."""
    from specplug.benchmarks.runner import BenchConfig, run_bench

    print(f"\n== {dtype}: SmolLM2-135M-Instruct, {torch.get_num_threads()} thread(s); "
          f"drafter {method}{' ' + drafter if drafter else ''}"
          f"{', speculation budget on' if args.budget else ''}; {args.num_prompts} MT-Bench "
          f"questions, {args.repeats} repetitions")
    cfg = BenchConfig(suite="mtbench", target=target, method=method, drafter=drafter,
                      options=dict(options), anchors=False, num_prompts=args.num_prompts,
                      max_new_tokens=args.max_new_tokens, gamma=args.gamma, dtype=dtype,
                      repeats=args.repeats, name=f"demo_{dtype}",
                      budget="on" if args.budget else "off")
    run = run_bench(cfg, progress=False)
    plain, spec = run["arms"][0], run["arms"][1]
    sp = spec["speedup_spread"]
    same, n = spec["matches_baseline"], len(spec["requests"])
    print(f"plain {plain['summary']['tokens_per_second']:.1f} tok/s | {method} "
          f"{spec['summary']['tokens_per_second']:.1f} tok/s | speedup {sp['median']:.2f}x "
          f"(min {sp['min']:.2f}, max {sp['max']:.2f} over {len(sp['per_rep'])} repetitions) | "
          f"tau {spec['summary']['mean_accept_length']:.2f} | outputs identical to plain: "
          f"{same}/{n}")
    if same < n and dtype == "bfloat16":
        print("(bf16 rounds a token differently as row k of a multi-token matmul than alone, so "
              "plain and speculative bf16 part ways at near-ties; float32 above is the check)")
    return run


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware; without it bf16 runs several times slower
    than float32 (measured: 5 vs 31 GFLOP/s on an AVX2-only EPYC), which says nothing about
    speculation."""
    from specplug.benchmarks.metrics import cpu_vector_flags
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_vector_flags()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specplug-demo")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3,
                    help="passes over the questions; the speedup is reported as min/median/max")
    ap.add_argument("--gamma", type=int, default=5)
    # float32 shows bit-identical output; bf16 is where verification is cheap on CPU
    # (6 tokens cost ~1.1x one decode step with AVX-512 BF16, ~1.5x in fp32)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                    help="repeatable; default: float32, then bfloat16 where the CPU has bf16 "
                         "instructions")
    ap.add_argument("--method", help="drafter method (default: the best shipped, see best_drafter)")
    ap.add_argument("--drafter", help="drafter folder for --method (e.g. the shipped EAGLE-3 head)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (benchmarks use 1)")
    ap.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                    help="the automatic speculation budget (default on, as in `specplug "
                         "generate`); --no-budget drafts gamma every step")
    ap.add_argument("--output", default="out/demo_stats.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    target = prepare("smollm2")
    method, drafter, options = best_drafter()
    if args.method:
        method, drafter, options = args.method, args.drafter, {}
    dtypes = args.dtype or ["float32"] + (["bfloat16"] if native_bf16() else [])
    payload = {dtype: run_pair(target, dtype, method, drafter, options, args) for dtype in dtypes}
    first = next(iter(payload.values()))["arms"][1]["requests"][0]["output_text"]
    print("\nfirst answer:\n" + first[:400])
    payload["environment"] = environment()
    write_stats(args.output, payload)
    print(f"\nstats written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
