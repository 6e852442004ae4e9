"""The embedded engine with and without torch.compile on the target's forward (issue #13, part 6):
same prompts, same engine code, the two arms taking turns.

    python -m specplug.benchmarks.compile_target --target SMOLLM2 --mtbench 16 --batch-size 1 \
        --out benchmarks/results/compile_target_smollm2_b1.json

Greedy, plain decoding (no drafter: the target's forward is all that changes) unless --method
names a drafter.  Each arm first runs the whole batch once untimed (for the compiled arm that is
where Dynamo traces and Inductor compiles; recompiles for shapes it has not seen yet can still
fall in a timed run, and count there, as they would for a user).  Then every repetition runs the
batch once on each arm, the first arm alternating.  Reported: each arm's tokens/s per repetition
and the compiled/eager ratio as min/median/max, whether both arms' tokens match, and what Dynamo
counted (graphs, graph breaks, recompiles).
"""
from __future__ import annotations

import argparse
import time


def run_arms(target: str, prompts: list[list[int]], max_new: int, batch_size: int,
             repeats: int, method: str | None = None, path: str | None = None,
             gamma: int = 4) -> dict:
    import torch

    from specplug.drafters.base import DrafterSpec, build_drafter
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.engine.rows import Request
    from specplug.models.loading import load_causal_lm, load_tokenizer, target_info

    model = load_causal_lm(target, dtype=torch.float32)
    tok = load_tokenizer(target)
    engines = {}
    for arm, compiled in (("eager", False), ("compiled", True)):
        drafter = None
        if method:  # a drafter each: its per-request state must not be shared between arms
            drafter = build_drafter(DrafterSpec(method, path, {}), target_info(model, tok))
        engines[arm] = EmbeddedEngine(model, tok, drafter, gamma if drafter else 0,
                                      compile_target=compiled)
    reqs = [Request(list(p), max_new_tokens=max_new) for p in prompts]
    warmup_s = {}
    for arm, engine in engines.items():
        start = time.perf_counter()
        engine.generate(reqs, batch_size)
        warmup_s[arm] = round(time.perf_counter() - start, 2)
    runs: dict[str, list] = {arm: [] for arm in engines}
    names = list(engines)
    for rep in range(repeats):
        for arm in names[rep % 2:] + names[:rep % 2]:
            outputs, stats = engines[arm].generate(reqs, batch_size)
            runs[arm].append((outputs, stats.summary()))
    return {"warmup_s": warmup_s, "runs": runs}


def summarise(result: dict, meta: dict) -> dict:
    from .metrics import environment, spread
    runs = result["runs"]
    rate = {arm: [s["tokens_per_second"] for _, s in reps] for arm, reps in runs.items()}
    ratio = [c / e for c, e in zip(rate["compiled"], rate["eager"])]
    tokens = {arm: [o.output_token_ids for o in reps[0][0]] for arm, reps in runs.items()}
    return dict(meta, warmup_s=result["warmup_s"],
                tokens_per_second={arm: spread(r) for arm, r in rate.items()},
                compiled_over_eager=spread(ratio),
                identical_outputs=tokens["compiled"] == tokens["eager"],
                timing_ms={arm: reps[-1][1]["timing_ms"] for arm, reps in runs.items()},
                dynamo=_dynamo_counters(), environment=environment())


def _dynamo_counters() -> dict:
    from torch._dynamo.utils import counters
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "recompiles_hit_limit": sum(counters["recompile_limit"].values())
            if "recompile_limit" in counters else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--mtbench", type=int, default=16, metavar="N",
                   help="the first turns of N MT-Bench questions (with the chat template)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", help="a drafter (default: none, plain decoding)")
    p.add_argument("--drafter", help="the drafter's checkpoint folder, where it needs one")
    p.add_argument("--out", required=True, help="JSON output path")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats: at least 3 (min/median/max)")
    from specplug.api import write_stats

    from .vllm_compare import target_prompts
    prompts = target_prompts(args.target, None, args.mtbench)
    result = run_arms(args.target, prompts, args.max_new_tokens, args.batch_size, args.repeats,
                      args.method, args.drafter)
    meta = {"target": args.target, "suite": f"mtbench{args.mtbench}", "dtype": "float32",
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "method": args.method or "none"}
    out = summarise(result, meta)
    write_stats(args.out, out)  # never a half-written file
    r = out["compiled_over_eager"]
    print(f"compiled / eager tokens/s: {r['median']}x ({r['min']}-{r['max']}), "
          f"identical outputs: {out['identical_outputs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
