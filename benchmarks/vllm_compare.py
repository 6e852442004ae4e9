"""Same weights, two ways into vLLM: a specplug drafter through the plugin (custom_class) vs vLLM's
built-in method, plus vLLM without speculation.  Tokens/s ratio and tau, written to JSON.

    python -m specplug.benchmarks.vllm_compare --tiny --out stats/vllm_compare.json
    python -m specplug.benchmarks.vllm_compare --target T --draft D --prompts-file p.txt --out ...

Run from the main venv: every engine starts in its own subprocess with the vLLM venv's Python
(integrations/vllm/install_cpu.sh; SPECPLUG_VLLM_PYTHON overrides).  Greedy; each engine runs the
whole batch once untimed (8 tokens a request), then times it --repeats times and reports the
median.  The load average is recorded beside: on a shared machine, compare ratios from one run.
Pairs:
  ngram  specplug n-gram (max_ngram N, min 1)      vs  vLLM "ngram" (prompt_lookup_max N, min 1)
  draft  specplug draft model (HF forward in-loop) vs  vLLM "draft_model" (paged, same weights)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from specplug.integrations.vllm.subprocess_job import run_job


def pairs(draft: str | None, gamma: int, max_ngram: int) -> dict[str, dict[str, dict]]:
    """name -> {"specplug": job fields, "vllm": job fields} for the same weights."""
    out = {"ngram": {
        "specplug": {"specplug": {"method": "ngram", "num_draft_tokens": gamma,
                                  "options": {"max_ngram": max_ngram, "min_ngram": 1}}},
        "vllm": {"speculative_config": {"method": "ngram", "num_speculative_tokens": gamma,
                                        "prompt_lookup_max": max_ngram, "prompt_lookup_min": 1}}}}
    if draft:
        out["draft"] = {
            "specplug": {"specplug": {"method": "draft", "path": draft, "num_draft_tokens": gamma}},
            "vllm": {"speculative_config": {"method": "draft_model", "model": draft,
                                            "num_speculative_tokens": gamma}}}
    return out


def compare(target: str, draft: str | None, prompt_ids: list[list[int]], gamma: int,
            max_new: int, max_ngram: int, workdir: str, ignore_eos: bool, repeats: int = 3,
            llm_kwargs: dict | None = None) -> dict:
    base_job = {"target": target, "prompt_ids": prompt_ids, "max_new_tokens": max_new,
                "ignore_eos": ignore_eos, "warmup": True, "repeats": repeats,
                "llm_kwargs": {"max_model_len": 512, **(llm_kwargs or {})}}
    load_before = os.getloadavg()
    plain = run_job(base_job, workdir, "plain")
    plain_tps = plain["summary"]["tokens_per_second"]
    plain_ids = [r["output_token_ids"] for r in plain["requests"]]
    result = {"target": target, "draft": draft, "gamma": gamma, "max_new_tokens": max_new,
              "num_prompts": len(prompt_ids), "repeats": repeats,
              "no_spec": _brief(plain["summary"]), "pairs": {}}
    for name, sides in pairs(draft, gamma, max_ngram).items():
        row = {}
        for side, fields in sides.items():
            res = run_job({**base_job, **fields}, workdir, f"{name}-{side}")
            row[side] = _brief(res["summary"])
            row[side]["speedup_vs_no_spec"] = round(res["summary"]["tokens_per_second"] / plain_tps, 3)
            row[side]["identical_to_no_spec"] = [r["output_token_ids"] for r in res["requests"]] == plain_ids
        row["tokens_per_second_ratio"] = round(
            row["specplug"]["tokens_per_second"] / row["vllm"]["tokens_per_second"], 3)
        row["tau_ratio"] = round(row["specplug"]["tau"] / row["vllm"]["tau"], 3)
        result["pairs"][name] = row
    result["load_average_1min"] = {"start": round(load_before[0], 2),
                                   "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    return result


def _brief(summary: dict) -> dict:
    drafts = summary["num_drafts"]
    return {"tokens_per_second": summary["tokens_per_second"],
            # tau over verify steps that carried drafts, as vLLM reports it (includes the bonus)
            "tau": round(1 + summary["num_accepted_tokens"] / drafts, 4) if drafts else 1.0,
            "tau_all_steps": summary["mean_accept_length"],
            "acceptance_rate": summary["acceptance_rate"], "num_drafts": drafts,
            "wall_time_s": summary["wall_time_s"], "total_new_tokens": summary["total_new_tokens"]}


def tiny_models(folder: str) -> tuple[str, str, list[list[int]]]:
    """A tiny float32 target (head size 64, as vLLM's CPU attention needs) and a perturbed copy."""
    import torch

    from specplug.models.tiny import (build_tiny_llama, build_tiny_tokenizer, perturbed_copy,
                                      save_model)
    tok = build_tiny_tokenizer()
    target = build_tiny_llama(0, dtype=torch.float32, hidden=128, heads=2, kv_heads=2, layers=2)
    t = save_model(target, tok, os.path.join(folder, "target"))
    d = save_model(perturbed_copy(target, 0.1), tok, os.path.join(folder, "draft"))
    texts = ["the cat sat on the mat. the dog", "def add(a, b): return a + b. def",
             "one two three four five six", "hello world, hello", "a bird flew over the tree",
             "the dog sat on the log. a bird", "def mul(a, b): return", "seven eight nine ten."]
    return t, d, [tok.encode(x) for x in texts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="build tiny models instead of --target")
    p.add_argument("--target")
    p.add_argument("--draft", help="draft model folder (same tokenizer) for the draft pair")
    p.add_argument("--prompts-file", help="one prompt a line (needs --target's tokenizer)")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median kept)")
    p.add_argument("--out", required=True, help="JSON output path")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            target, draft, prompts = tiny_models(tmp)
            ignore_eos = True
            llm_kwargs = {"kv_cache_memory_bytes": 64 << 20}  # a few MiB is plenty here
        else:
            if not (args.target and args.prompts_file):
                p.error("--target and --prompts-file are needed without --tiny")
            from specplug.models.loading import load_tokenizer
            tok = load_tokenizer(args.target)
            with open(args.prompts_file) as f:
                prompts = [tok.encode(line.rstrip("\n")) for line in f if line.strip()]
            target, draft, ignore_eos, llm_kwargs = args.target, args.draft, False, {}
        result = compare(target, draft, prompts, args.gamma, args.max_new_tokens, args.max_ngram,
                         tmp, ignore_eos, args.repeats, llm_kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for name, row in result["pairs"].items():
        print(f"{name}: specplug/vLLM tokens/s {row['tokens_per_second_ratio']}x, "
              f"tau {row['specplug']['tau']} vs {row['vllm']['tau']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
