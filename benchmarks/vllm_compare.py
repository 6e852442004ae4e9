"""Same weights, two ways into vLLM: a specplug drafter through the plugin (custom_class) vs vLLM's
built-in method, plus vLLM without speculation.  Tokens/s ratio and tau, written to JSON.

    python -m specplug.benchmarks.vllm_compare --tiny --out stats/vllm_compare.json
    python -m specplug.benchmarks.vllm_compare --target T --draft D --prompts-file p.txt --out ...
    python -m specplug.benchmarks.vllm_compare --target SMOLLM2 --eagle3 HEAD --mtbench 10 \
        --pairs eagle3 --out benchmarks/results/vllm_compare_smollm2_eagle3.json

Run from the main venv: every engine is an engine session (specplug/jobfile.py) of the vLLM
venv's Python (integrations/vllm/install_cpu.sh; SPECPLUG_VLLM_PYTHON overrides), all started
first and kept up.  Greedy; each engine runs the whole batch once untimed (8 tokens a request);
then every repetition runs the batch once on each engine, the engines taking turns in an order
that rotates, and each ratio is reported as min/median/max over the repetitions (load drifting
on a shared machine falls on every engine alike).  The load average is recorded beside.
Pairs:
  ngram  specplug n-gram (max_ngram N, min 1)      vs  vLLM "ngram" (prompt_lookup_max N, min 1)
  draft  specplug draft model (HF forward in-loop) vs  vLLM "draft_model" (paged, same weights)
  eagle3 specplug EAGLE-3 drafter through the plugin (custom_class, target features from vLLM's
         own aux hidden-state outputs) vs vLLM "eagle3" on the same head converted by
         `specplug convert --to speculators`
  hybrid specplug hybrid (suffix lookup + the --eagle3 head) through the plugin, two ways: in
         vLLM's default compile mode ("compile") vs with enforce_eager ("eager", what the
         forward hooks needed before the plugin read vLLM's aux outputs)
Every engine runs eager (enforce_eager, the CPU default of specplug's vLLM sessions) unless
--compile asks for vLLM's default compile mode; the hybrid pair sets it per side.  The mode vLLM
reports for each engine is recorded in the JSON (compilation_modes).
Every engine runs without prefix caching: the timed repeats would otherwise skip the prompts'
prefill on one side (the plugin's hidden-state drafters need it off).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile


def pairs(draft: str | None, gamma: int, max_ngram: int, eagle3: tuple[str, str] | None = None
          ) -> dict[str, dict[str, dict]]:
    """name -> {side: job fields} for the same weights, two sides a pair, the first one's
    tokens/s over the second's reported ("specplug" / "vllm", or "compile" / "eager").
    eagle3: (specplug head folder, the same head in speculators format)."""
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
    if eagle3:
        head, converted = eagle3
        out["eagle3"] = {
            "specplug": {"specplug": {"method": "eagle3", "path": head, "num_draft_tokens": gamma,
                                      "via_plugin": True}},
            "vllm": {"speculative_config": {"method": "eagle3", "model": converted,
                                            "num_speculative_tokens": gamma}}}
        hybrid = {"specplug": {"method": "hybrid", "path": head, "num_draft_tokens": gamma,
                               "options": {"lookup": "suffix"}}}
        out["hybrid"] = {"compile": dict(hybrid, llm_kwargs={"enforce_eager": False}),
                         "eager": dict(hybrid, llm_kwargs={"enforce_eager": True})}
    return out


def convert_to_speculators(head: str, target: str, folder: str) -> str:
    """The specplug EAGLE-3 head in the speculators format vLLM's eagle3 method loads."""
    from specplug.converters.cli import main as convert_main
    out = os.path.join(folder, "eagle3-speculators")
    if convert_main([head, out, "--to", "speculators", "--verifier", target, "--force"]) != 0:
        raise RuntimeError(f"specplug convert {head} --to speculators failed")
    return out


def compare(target: str, draft: str | None, prompt_ids: list[list[int]], gamma: int,
            max_new: int, max_ngram: int, workdir: str, ignore_eos: bool, repeats: int = 3,
            llm_kwargs: dict | None = None, eagle3: str | None = None,
            only: list[str] | None = None) -> dict:
    # engines run in workdir: relative folders would not resolve there (a name that is no
    # local folder, e.g. a hub id, stays as it is)
    target, draft, eagle3 = (os.path.abspath(p) if p and os.path.exists(p) else p
                             for p in (target, draft, eagle3))
    base_job = {"target": target, "longest": max(map(len, prompt_ids)) + max_new,
                "llm_kwargs": {"max_model_len": 512, "enable_prefix_caching": False,
                               **(llm_kwargs or {})}}
    heads = (eagle3, convert_to_speculators(eagle3, target, workdir)) if eagle3 else None
    todo = pairs(draft, gamma, max_ngram, heads)
    unknown = sorted(set(only or []) - set(todo))
    if unknown:
        raise ValueError(f"--pairs {unknown[0]}: not available here (have {', '.join(todo)}; "
                         "draft needs --draft, eagle3 needs --eagle3)")
    arms = {"plain": {}}
    for name, sides in todo.items():
        if not only or name in only:
            arms.update({f"{name}-{side}": fields for side, fields in sides.items()})
    load_before = os.getloadavg()
    batch = {"prompt_ids": prompt_ids, "max_new_tokens": max_new, "ignore_eos": ignore_eos}
    runs, modes = _interleaved(arms, base_job, batch, repeats, workdir)
    plain_ids = [r["output_token_ids"] for r in runs["plain"][0]["requests"]]
    result = {"target": target, "draft": draft, "eagle3": eagle3, "gamma": gamma,
              "max_new_tokens": max_new, "num_prompts": len(prompt_ids), "repeats": repeats,
              "llm_kwargs": base_job["llm_kwargs"], "no_spec": _brief(runs["plain"]),
              "pairs": {}}
    result["compilation_modes"] = modes
    for name, sides in todo.items():
        if only and name not in only:
            continue
        row = {"sides": list(sides)}
        for side in sides:
            got = runs[f"{name}-{side}"]
            row[side] = _brief(got)
            row[side]["speedup_vs_no_spec"] = _spread(got, runs["plain"])
            row[side]["identical_to_no_spec"] = all(
                [r["output_token_ids"] for r in g["requests"]] == plain_ids for g in got)
        first, second = sides
        ratio = _spread(runs[f"{name}-{first}"], runs[f"{name}-{second}"])
        row["tokens_per_second_ratio"] = ratio["median"]
        row["tokens_per_second_ratio_spread"] = ratio
        row["tau_ratio"] = round(row[first]["tau"] / row[second]["tau"], 3)
        result["pairs"][name] = row
    result["load_average_1min"] = {"start": round(load_before[0], 2),
                                   "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    return result


def _interleaved(arms: dict[str, dict], base_job: dict, batch: dict, repeats: int,
                 workdir: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """(arm -> one result per repetition, arm -> vLLM's compilation mode): every engine up at
    once, a warm-up each, then the engines take turns, the first one rotating every repetition.
    An arm's own llm_kwargs are laid over the shared ones."""
    from specplug.integrations.vllm.subprocess_job import vllm_env, vllm_python
    from specplug.jobfile import SessionClient
    clients, modes = {}, {}
    try:
        for name, fields in arms.items():
            clients[name] = SessionClient(vllm_python(), "specplug.integrations.vllm.generate",
                                          vllm_env(False), os.path.join(workdir, f"{name}.log"),
                                          cwd=workdir)
            llm_kwargs = {**base_job["llm_kwargs"], **fields.get("llm_kwargs", {})}
            opened = clients[name].call({"open": {**base_job, **fields, "llm_kwargs": llm_kwargs}},
                                        timeout=1800)
            modes[name] = opened.get("environment", {}).get("compilation_mode", "unknown")
            clients[name].call({"run": dict(batch, max_tokens=8)})
        names = list(arms)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                runs[name].append(clients[name].call({"run": batch}))
        return runs, modes
    finally:
        for client in clients.values():
            client.close()


def _spread(runs: list[dict], base: list[dict]) -> dict:
    """tokens/s(runs) / tokens/s(base) per repetition -> min/median/max."""
    from .metrics import spread
    return spread([a["summary"]["tokens_per_second"] / b["summary"]["tokens_per_second"]
                   for a, b in zip(runs, base)])


def _brief(runs: list[dict]) -> dict:
    """The repetitions' median tokens/s and the counters (equal in every greedy repetition)."""
    summary = runs[0]["summary"]
    drafts = summary["num_drafts"]
    rates = sorted(r["summary"]["tokens_per_second"] for r in runs)
    return {"tokens_per_second": rates[len(rates) // 2],
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


def target_prompts(target: str, prompts_file: str | None, mtbench: int | None) -> list[list[int]]:
    """Token ids: one prompt a line of prompts_file (plain), or MT-Bench first turns through the
    target's chat template."""
    from specplug.prompts import encode_prompts
    from specplug.models.loading import load_tokenizer
    tok = load_tokenizer(target)
    if mtbench:
        from specplug.datasets import load_prompts
        items = load_prompts("mtbench", mtbench, per_category=max(1, -(-mtbench // 8)))
        return encode_prompts(tok, [it.turns[0] for it in items], chat_template=True)
    with open(prompts_file) as f:
        return [tok.encode(line.rstrip("\n")) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="build tiny models instead of --target")
    p.add_argument("--target")
    p.add_argument("--draft", help="draft model folder (same tokenizer) for the draft pair")
    p.add_argument("--prompts-file", help="one prompt a line (needs --target's tokenizer)")
    p.add_argument("--mtbench", type=int, metavar="N",
                   help="the first turn of N MT-Bench questions (one per category first), with "
                        "the target's chat template, instead of --prompts-file")
    p.add_argument("--eagle3", help="specplug EAGLE-3 head folder for the eagle3 pair")
    p.add_argument("--pairs", nargs="+",
                   help="run only these pairs (ngram, draft, eagle3, hybrid)")
    p.add_argument("--compile", action="store_true",
                   help="vLLM's default compile mode for every engine (default: enforce_eager)")
    p.add_argument("--dtype", default="float32", help="vLLM dtype of every engine")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3,
                   help="repetitions; every engine runs the batch once in each")
    p.add_argument("--out", required=True, help="JSON output path")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            target, draft, prompts = tiny_models(tmp)
            ignore_eos = True
            llm_kwargs = {"kv_cache_memory_bytes": 64 << 20}  # a few MiB is plenty here
        else:
            if not (args.target and (args.prompts_file or args.mtbench)):
                p.error("--target and --prompts-file (or --mtbench N) are needed without --tiny")
            prompts = target_prompts(args.target, args.prompts_file, args.mtbench)
            target, draft, ignore_eos, llm_kwargs = args.target, args.draft, False, {}
        llm_kwargs["dtype"] = args.dtype
        llm_kwargs["enforce_eager"] = not args.compile
        result = compare(target, draft, prompts, args.gamma, args.max_new_tokens, args.max_ngram,
                         tmp, ignore_eos, args.repeats, llm_kwargs, args.eagle3, args.pairs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for name, row in result["pairs"].items():
        first, second = row["sides"]
        print(f"{name}: {first}/{second} tokens/s {row['tokens_per_second_ratio']}x, "
              f"tau {row[first]['tau']} vs {row[second]['tau']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
