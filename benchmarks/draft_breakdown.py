"""Where a drafter's time goes inside a real decode (issue 13: "report the draft time for every
family, with where the time goes").

    python -m specplug.benchmarks.draft_breakdown --target SMOLLM2 --method hybrid \
        --drafter specplug/assets/drafters/smollm2-eagle3 \
        --option mode=tree --option head_min_confidence=0.6 --option lookup=suffix \
        --per-category 1 --dtype bfloat16 --out benchmarks/results/draft_breakdown_hybrid.json

The embedded engine decodes MT-Bench prompts at batch 1 twice: once untimed (warm-up), once
with a forward pre/post hook on each of the drafter's modules (two levels deep) that adds up
wall time.  Reported per decode step: the engine's draft time, each module's time, and the
draft time spent outside every module (host bookkeeping, lookups, masks, sampling).  Then each
leaf linear layer is called again, alone, on the input it last saw: a layer alone keeps its
weights in cache, which a decode step, where the target's weights pass through the cache between
two drafter calls, does not; the ratio of the two says how much of the drafter is the weights'
trip from memory.  The hooks cost a few microseconds per call, counted in the module times.
"""
from __future__ import annotations

import argparse
import collections
import json
import time


def _hooked(modules: dict, totals: dict, calls: collections.Counter, inputs: dict) -> list:
    started: dict[str, float] = {}
    handles = []
    for name, mod in modules.items():
        def pre(_, args, name=name):
            started[name] = time.perf_counter()
            if len(args) == 1:
                inputs[name] = args[0]  # the leaf layers' last input, replayed alone later

        def post(_, args, out, name=name):
            totals[name] += time.perf_counter() - started[name]
            calls[name] += 1
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def _alone_us(module, x, repeats: int = 200) -> float:
    import torch
    with torch.inference_mode():
        for _ in range(10):
            module(x)
        start = time.perf_counter()
        for _ in range(repeats):
            module(x)
    return (time.perf_counter() - start) / repeats * 1e6


def breakdown(target: str, method: str, drafter: str | None, options: dict, per_category: int,
              max_new: int, dtype: str) -> dict:
    import torch

    from specplug.api import GenerateConfig, build_embedded, load_target
    from specplug.datasets import load_prompts
    from specplug.engine.embedded import context_limit
    from specplug.prompts import requests_for

    prompts = [item.turns[0] for item in load_prompts("mtbench", per_category=per_category)]
    model, tok = load_target(target, dtype)
    cfg = GenerateConfig(target=target, prompts=prompts, method=method, drafter=drafter,
                         max_new_tokens=max_new, dtype=dtype,
                         chat_template=bool(getattr(tok, "chat_template", None)),
                         options=options, budget=False)
    engine = build_embedded(cfg, model, tok)
    # prompts too long for the model's context are left out, as the benchmarks leave them out
    room = context_limit(model.config) - max_new - engine.num_draft_tokens - 1
    reqs = [r for r in requests_for(cfg, tok) if len(r.prompt_ids) <= room]
    if not reqs:
        raise ValueError(f"no MT-Bench prompt fits the model's context with {max_new} new tokens")
    engine.generate(reqs, 1)  # warm-up: packing, allocation, first calls
    tops = engine.drafter.torch_modules()
    # a module another one holds (the target's embedding in an EAGLE head) is timed inside it
    held = {id(m) for top in tops for m in list(top.modules())[1:]}
    tops = [top for top in tops if id(top) not in held]
    modules, top_names = {}, []
    for i, top in enumerate(tops):
        label = type(top).__name__ + (f"#{i}" if len(tops) > 1 else "")
        top_names.append(label)
        for name, mod in top.named_modules():
            if name.count(".") <= 1:  # two levels: layers and their parts
                modules[f"{label}.{name}" if name else label] = mod
    totals, calls, inputs = collections.defaultdict(float), collections.Counter(), {}
    handles = _hooked(modules, totals, calls, inputs)
    outputs, stats = engine.generate(reqs, 1)
    for h in handles:
        h.remove()
    steps = stats.num_steps or sum(len(o.accept_lengths) for o in outputs)
    in_modules = sum(totals.get(n, 0.0) for n in top_names) * 1e3
    rows = []
    for name in sorted(totals, key=lambda n: -totals[n]):
        mod = modules[name]
        row = {"module": name, "calls": calls[name],
               "ms_per_step": totals[name] * 1e3 / steps,
               "us_per_call": totals[name] * 1e6 / calls[name]}
        if isinstance(mod, torch.nn.Linear) and name in inputs:
            row["us_per_call_alone"] = _alone_us(mod, inputs[name])
            row["weights_mb"] = mod.weight.numel() * mod.weight.element_size() / 1e6
        rows.append(row)
    draft = stats.timing_ms.get("draft", 0.0)
    return {"method": method, "drafter": drafter, "options": options, "dtype": dtype,
            "prompts": len(reqs), "max_new_tokens": max_new, "steps": steps,
            "tokens_per_step": stats.total_new_tokens / steps,
            "threads": torch.get_num_threads(),
            "draft_ms_per_step": draft / steps,
            "verify_ms_per_step": stats.timing_ms.get("verify", 0.0) / steps,
            "outside_modules_ms_per_step": (draft - in_modules) / steps,
            "modules": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specplug.benchmarks.draft_breakdown")
    p.add_argument("--target", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--drafter")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--out")
    args = p.parse_args(argv)
    from specplug.cli import _parse_options
    result = breakdown(args.target, args.method, args.drafter, _parse_options(args.option),
                       args.per_category, args.max_new_tokens, args.dtype)
    print(f"{args.method}: {result['steps']} steps, draft {result['draft_ms_per_step']:.2f} "
          f"ms/step (verify {result['verify_ms_per_step']:.2f}), outside modules "
          f"{result['outside_modules_ms_per_step']:.2f}")
    for row in result["modules"]:
        alone = row.get("us_per_call_alone")
        print(f"  {row['module']:50s} {row['ms_per_step']:6.3f} ms/step  "
              f"{row['us_per_call']:7.1f} us/call" + (f"  alone {alone:6.1f}" if alone else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
