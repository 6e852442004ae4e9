"""One benchmark run: every arm (plain baseline, speculative, HF anchors) on the same prompts,
alternating block by block, repeated `repeats` times; then one JSON with the stats schema plus
speedups (median and spread over the repetitions), tau per category and the Leviathan bound.

Why this shape: on a shared machine load drifts over minutes.  Arms that take turns every block
(in an order that rotates) see the same drift, and each repetition gives one speedup per arm, so
the spread of those speedups says how far a single number can be trusted."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from specplug.datasets import DatasetError, PromptItem, load_prompts
from specplug.drafters.base import DrafterSpec
from specplug.engine.embedded import context_limit
from specplug.engine.rows import Request
from specplug.stats import SpecStats
from specplug.types import SamplingParams

from . import metrics
from .engines import HF_EQUIVALENT, Arm, BenchTarget, build_arms, check_engine
from .prompting import encode, has_chat_template, render

SCHEMA = "specplug-bench/1"


@dataclass
class BenchConfig:
    suite: str
    target: str
    method: str = "ngram"  # "none": baselines and anchors only
    drafter: str | None = None  # checkpoint folder for methods with weights
    options: dict = field(default_factory=dict)
    engine: str = "embedded"
    anchors: bool = True  # add the HF generate() arms beside a non-HF engine
    # more engines whose arms join the run; each one's plain arm is also reported against
    # `engine`'s plain arm (speedup_vs_reference)
    also_engines: list = field(default_factory=list)
    num_prompts: int | None = None
    per_category: int | None = None  # first k prompts of each category
    turns: int = 1
    max_new_tokens: int = 128
    batch_size: int = 1
    # draft tokens per step for every arm; None: each arm's method's own default (gamma_for)
    gamma: int | None = None
    temperature: float = 0.0
    chat_template: bool = True
    seed: int = 0
    dtype: str = "float32"
    output: str = "bench_results"
    name: str | None = None  # JSON file stem; default from suite/engine/method
    # more embedded drafter arms in the same run: (label, spec), label unique among them
    compare: list = field(default_factory=list)
    budget: str = "off"  # embedded drafter arms with the speculation budget: on | off | both
    repeats: int = 3  # passes over the prompts; speedups are reported as min/median/max of them
    block: int = 0  # requests per block (arms take turns every block); 0 = batch_size
    sweep: str | None = None  # the batch sweep this run belongs to (batch_sweep.py), if any

    def run_name(self) -> str:
        if self.name:
            return self.name
        suite = os.path.splitext(os.path.basename(self.suite))[0]
        n = f"k{self.per_category}" if self.per_category else f"n{self.num_prompts or 'all'}"
        return f"{suite}_t{self.turns}_{self.engine}_{self.method}_{n}"


@dataclass
class _ArmState:
    arm: Arm
    stats: SpecStats = field(default_factory=SpecStats)  # every repetition pooled
    rep_stats: list[SpecStats] = field(default_factory=list)  # one per repetition
    # turn -> one SpecStats per repetition (a 2-turn run reports each turn on its own too)
    turn_stats: dict[int, list[SpecStats]] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)  # JSON records of the first repetition
    outputs: list = field(default_factory=list)  # RequestOutput, same order


def run_bench(cfg: BenchConfig, progress: bool = True, log=print) -> dict:
    import torch
    from transformers.utils import logging as hf_logging
    from specplug.drafters.base import available_methods, gamma_for
    from specplug.models.loading import load_causal_lm, load_tokenizer

    if cfg.turns not in (1, 2):
        raise ValueError(f"--turns must be 1 or 2, got {cfg.turns}")
    for name, v in (("--max-new-tokens", cfg.max_new_tokens), ("--batch-size", cfg.batch_size),
                    ("--gamma", 1 if cfg.gamma is None else cfg.gamma),
                    ("--repeats", cfg.repeats)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    items = load_prompts(cfg.suite, cfg.num_prompts, cfg.per_category)
    check_engine(cfg.engine)
    for method in [cfg.method] + [spec.method for _, spec in cfg.compare]:
        if method != "none" and method not in available_methods():
            raise ValueError(f"unknown method {method!r}; known: none, {', '.join(available_methods())}")
    labels = [cfg.method] + [label for label, _ in cfg.compare]
    if len(set(labels)) != len(labels):
        raise ValueError(f"arm labels must differ, got {labels}: name them LABEL:METHOD")
    if cfg.block < 0:
        raise ValueError(f"--block must be >= 0, got {cfg.block}")
    if cfg.budget not in ("on", "off", "both"):
        raise ValueError(f"--budget must be on, off or both, got {cfg.budget!r}")
    if cfg.budget != "off" and cfg.engine not in ("embedded", "vllm"):
        raise ValueError(f"--budget {cfg.budget}: the budget runs in the embedded engine and "
                         f"vLLM, not in {cfg.engine}")
    if cfg.compare and cfg.engine not in ("embedded", "vllm", "sglang"):
        raise ValueError(f"--compare adds drafter arms to the embedded engine, vLLM or SGLang, "
                         f"not {cfg.engine}")
    hf_logging.disable_progress_bar()  # the bench has its own bar
    model = load_causal_lm(cfg.target, dtype=getattr(torch, cfg.dtype))
    tokenizer = load_tokenizer(cfg.target)
    drafter = None if cfg.method == "none" else DrafterSpec(cfg.method, cfg.drafter, cfg.options)
    # engines round their context up (to 64 in our vLLM and SGLang sessions) and add room for
    # gamma drafts: prompt + new tokens must leave that much headroom below the model's limit
    longest_draft = max(gamma_for(m, cfg.gamma) for m in
                        [cfg.method] + [spec.method for _, spec in cfg.compare])
    limit = context_limit(model.config) - 64 - longest_draft - 1
    target = BenchTarget(cfg.target, model, tokenizer, drafter, cfg.gamma,
                         SamplingParams(temperature=cfg.temperature), cfg.batch_size,
                         list(cfg.compare), cfg.budget, longest=limit)
    engines = [cfg.engine] + [e for e in cfg.also_engines if e != cfg.engine]
    if cfg.anchors and "hf" not in engines:
        engines.append("hf")

    def fresh_arms() -> list[Arm]:
        return [a for e in engines for a in build_arms(e, target)]

    states = [_ArmState(a) for a in fresh_arms()]
    use_chat = cfg.chat_template and has_chat_template(tokenizer)
    try:
        skipped = _run_all(cfg, states, fresh_arms, items, tokenizer, use_chat, limit, progress)
        result = _assemble(cfg, states, items, skipped, use_chat)
    finally:
        for st in states:
            st.arm.close()
    for st in states:
        log(st.stats.summary_line(st.arm.label))
    return result


def _run_all(cfg: BenchConfig, states: list[_ArmState], fresh_arms, items: list[PromptItem],
             tokenizer, use_chat: bool, limit: int, progress: bool) -> list[str]:
    """Every repetition of every turn; returns the ids left out as too long for the model.

    Each repetition starts from fresh arms (new drafters, new engine processes): a drafter that
    learns across requests (suffix decoding's store of earlier outputs) would otherwise meet
    every prompt of a later repetition with its answer already stored."""
    bar = _progress(sum(min(cfg.turns, len(i.turns)) for i in items) * len(states) * cfg.repeats,
                    progress)
    skipped: list[str] = []
    answers: dict[str, list[str]] = {i.id: [] for i in items}
    turn_reqs: list[list] = []  # built in the first repetition, reused by the others
    block = cfg.block or cfg.batch_size
    for rep in range(cfg.repeats):
        if rep:
            for st, arm in zip(states, fresh_arms()):
                st.arm.close()
                st.arm = arm
        rep_stats = [SpecStats() for _ in states]
        for turn in range(cfg.turns):
            if rep == 0:
                turn_reqs.append(_turn_requests(cfg, items, turn, answers, skipped, tokenizer,
                                                use_chat, limit))
            reqs = turn_reqs[turn]
            if turn == 0 and reqs:
                _warm_up(states, reqs[:block], tokenizer, cfg.suite)
            turn_stats = [SpecStats() for _ in states]
            main_outs = _run_turn(states, turn_stats, reqs, turn, block, keep=rep == 0, bar=bar,
                                  first=rep)
            for st, one, whole in zip(states, turn_stats, rep_stats):
                st.turn_stats.setdefault(turn + 1, []).append(one)
                whole.merge(one)
            if rep == 0:
                for (item, _), out in zip(reqs, main_outs):
                    answers[item.id].append(out.output_text)
        for st, one in zip(states, rep_stats):
            st.rep_stats.append(one)
            st.stats.merge(one)
    if bar is not None:
        bar.close()
    return skipped


def _turn_requests(cfg: BenchConfig, items, turn: int, answers, skipped: list[str], tokenizer,
                   use_chat: bool, limit: int) -> list:
    batch = [i for i in items if turn < len(i.turns) and i.id not in skipped]
    reqs = []
    for k, item in enumerate(batch):
        text = render(tokenizer, item, turn, answers[item.id], use_chat)
        ids = encode(tokenizer, text, use_chat and item.chat)
        if len(ids) + cfg.max_new_tokens > limit:
            skipped.append(item.id)  # too long for the model's context: left out of every arm
            continue
        reqs.append((item, Request(ids, cfg.max_new_tokens, seed=cfg.seed + k, prompt=text)))
    return reqs


def _run_turn(states: list[_ArmState], rep_stats: list[SpecStats], reqs, turn: int, block: int,
              keep: bool, bar, first: int = 0):
    """Every arm on reqs, one block at a time, the arms' order rotating by one each block and
    starting `first` places on (the repetition: where a turn is one block, as at batch 32 on
    32 prompts, the same arm would otherwise always run first); returns the first arm's (the
    main baseline's) outputs."""
    main_outs = []
    for b, start in enumerate(range(0, len(reqs), block)):
        chunk = reqs[start:start + block]
        order = list(range(len(states)))
        shift = (b + first) % len(order)
        order = order[shift:] + order[:shift]
        for i in order:
            st = states[i]
            outs = st.arm.run([r for _, r in chunk], rep_stats[i])
            if i == 0:
                main_outs += outs
            if keep:
                _keep(st, chunk, outs, turn)
            if bar is not None:
                bar.set_postfix_str(st.arm.label)
                bar.update(len(chunk))
    return main_outs


def _keep(st: _ArmState, chunk, outs, turn: int) -> None:
    st.outputs += outs
    for (item, req), out in zip(chunk, outs):
        st.requests.append({
            "id": item.id, "category": item.category, "turn": turn + 1, "prompt": req.prompt,
            "num_prompt_tokens": len(req.prompt_ids), "output_text": out.output_text,
            "output_token_ids": out.output_token_ids, "num_new_tokens": out.num_new_tokens,
            "accept_lengths": out.accept_lengths, "finish_reason": out.finish_reason})


def _warm_up(states: list[_ArmState], first_block: list, tokenizer, suite: str) -> None:
    """Every arm runs a block shaped like the first one (same prompt lengths), 8 new tokens each,
    untimed: engine start-up, lazy allocation and first-call costs fall on no measured block.
    Its prompts come from another prompt set (_warm_up_prompts): a drafter that stores outputs
    must not see a measured prompt before it is measured."""
    prompts = _warm_up_prompts([len(r.prompt_ids) for _, r in first_block], tokenizer, suite)
    reqs = [Request(ids, min(8, r.max_new_tokens), seed=r.seed)
            for ids, (_, r) in zip(prompts, first_block)]
    for st in states:
        st.arm.run(reqs, SpecStats())


def _warm_up_prompts(lengths: list[int], tokenizer, suite: str) -> list[list[int]]:
    """Token prompts of these lengths cut from real text of a set the run does not measure
    (ShareGPT; MT-Bench where ShareGPT is measured), one conversation after another per row.
    Why real text: the budget arms learn their first acceptance here.  A repeated filler
    sentence, which every lookup drafter predicts, taught them near-certain drafts, and at batch
    32 (32 steps in all) their first measured steps drafted wide and paid for it (suffix with
    its budget reset after the warm-up: 0.91-0.95x against 0.89x, two development runs)."""
    other = "mtbench" if os.path.basename(suite).startswith("sharegpt") else "sharegpt"
    try:
        texts = [t for item in load_prompts(other, 4 * len(lengths) + 8) for t in item.turns]
    except DatasetError:
        texts = []
    stream = [t for text in texts for t in tokenizer(text + "\n")["input_ids"]]
    if not stream:  # the prompt set is not installed: the filler sentence
        stream = tokenizer("The quick brown fox jumps over the lazy dog. ")["input_ids"] or [0]
    out, at = [], 0
    for n in lengths:
        out.append([stream[(at + i) % len(stream)] for i in range(n)])
        at = (at + n) % len(stream)
    return out


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="bench", file=sys.stderr, dynamic_ncols=True)


def _assemble(cfg: BenchConfig, states, items: list[PromptItem], skipped, use_chat) -> dict:
    by_label = {s.arm.label: s for s in states}
    baselines = {s.arm.engine: s for s in states if s.arm.role == "baseline"}
    arms = []
    for st in states:
        summary = st.stats.summary()
        base = baselines.get(st.arm.engine)
        spread = _speedups(st, base)
        entry = {"label": st.arm.label, "engine": st.arm.engine, "method": st.arm.method,
                 "role": st.arm.role, "settings": st.arm.settings, "summary": summary,
                 "tokens_per_second_per_rep": [round(r.tokens_per_second, 3)
                                               for r in st.rep_stats],
                 "mean_accept_length_per_rep": [round(r.mean_accept_length, 4)
                                                for r in st.rep_stats],
                 "tau_per_category": metrics.tau_per_category(st.requests),
                 "speedup": spread["median"] if spread else None, "speedup_spread": spread,
                 "requests": st.requests}
        if cfg.turns > 1:
            entry["per_turn"] = _per_turn(st, base)
        if st.arm.environment():
            entry["engine_environment"] = st.arm.environment()
        hf = by_label.get(HF_EQUIVALENT.get(st.arm.method, ""))
        if st.arm.engine != "hf" and hf is not None:
            entry["hf_equivalent"] = hf.arm.label
            hf_spread = _speedups(st, hf)
            entry["speedup_vs_hf_equivalent"] = hf_spread["median"] if hf_spread else None
            entry["speedup_vs_hf_equivalent_spread"] = hf_spread
        main = baselines.get(cfg.engine)
        if (st.arm.role == "baseline" and main is not None and st is not main
                and st.arm.engine in cfg.also_engines):
            # one engine's plain decoding against another's, on the same prompts, interleaved
            entry["reference"] = main.arm.label
            entry["speedup_vs_reference_spread"] = _speedups(st, main)
            entry["matches_reference"] = _same_outputs(st, main)
        if base is not None and st is not base:
            entry["matches_baseline"] = _same_outputs(st, base)
            if summary["num_draft_tokens"]:
                gamma = st.arm.settings.get("gamma") or gamma_for(None, cfg.gamma)
                c = metrics.draft_cost(summary, base.stats.summary(), gamma)
                entry["leviathan"] = metrics.leviathan_bound(summary["acceptance_rate"], gamma, c)
        arms.append(entry)
    head = next((a for a in arms if a["role"] == "spec"), None) or next(
        (a for a in arms if a["role"] == "anchor"), arms[0])
    config = asdict(cfg)
    config.update({"engines": sorted({s.arm.engine for s in states}), "chat_template_used": use_chat,
                   "num_items": len(items), "skipped_too_long": skipped})
    environment = metrics.environment()
    engine_envs = {a["label"]: a["engine_environment"] for a in arms if "engine_environment" in a}
    if engine_envs:
        environment["engines"] = engine_envs
    environment["cpu_standins"] = any(e.get("cpu_standins") for e in engine_envs.values())
    return {
        "schema": SCHEMA, "name": cfg.run_name(), "headline": head["label"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": head["summary"], "requests": head["requests"],
        "speedup": head["speedup"], "speedup_spread": head["speedup_spread"],
        "tau_per_category": head["tau_per_category"],
        "leviathan": head.get("leviathan"),
        "config": config, "environment": environment, "arms": arms,
    }


def _same_outputs(a: _ArmState, b: _ArmState) -> int:
    return sum(x["output_token_ids"] == y["output_token_ids"]
               for x, y in zip(a.requests, b.requests))


def _speedups(st: _ArmState, base: _ArmState | None) -> dict | None:
    """min/median/max over repetitions of tokens/s(arm) / tokens/s(base) in the same repetition."""
    return None if base is None else _ratio_spread(st.rep_stats, base.rep_stats)


def _ratio_spread(mine: list[SpecStats], theirs: list[SpecStats]) -> dict | None:
    per_rep = [a.tokens_per_second / b.tokens_per_second
               for a, b in zip(mine, theirs) if b.tokens_per_second]
    return metrics.spread(per_rep) if per_rep else None


def _per_turn(st: _ArmState, base: _ArmState | None) -> dict:
    """Turn ("1", "2") -> the arm's tokens/s, tau and speedup over the baseline on that turn's
    requests alone.  Turn 2's prompts hold the answer to turn 1, which a lookup drafter can
    draw on: pooled with turn 1, that would not show."""
    out = {}
    for turn, reps in sorted(st.turn_stats.items()):
        pooled = SpecStats()
        for one in reps:
            pooled.merge(one)
        theirs = base.turn_stats.get(turn, []) if base is not None else []
        spread = _ratio_spread(reps, theirs) if base is not None and base is not st else None
        out[str(turn)] = {"num_requests": pooled.num_prompts // max(len(reps), 1),
                          "total_new_tokens": pooled.total_new_tokens,
                          "wall_time_s": round(pooled.wall_time_s, 6),
                          "tokens_per_second": round(pooled.tokens_per_second, 3),
                          "tokens_per_second_per_rep": [round(r.tokens_per_second, 3)
                                                        for r in reps],
                          "mean_accept_length": round(pooled.mean_accept_length, 4),
                          "speedup": spread["median"] if spread else None,
                          "speedup_spread": spread}
    return out


def write_json(result: dict, out_dir: str) -> str:
    """Write atomically: a crash never leaves a half-written JSON for the report to read."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, result["name"] + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return path
