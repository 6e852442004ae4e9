"""One benchmark run: every arm (plain baseline, speculative, HF anchors) on the same prompts in
the same process, then one JSON with the stats schema plus speedups, tau per category and the
Leviathan bound."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from specplug.datasets import PromptItem, load_prompts
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
    num_prompts: int | None = None
    per_category: int | None = None  # first k prompts of each category
    turns: int = 1
    max_new_tokens: int = 128
    batch_size: int = 1
    gamma: int = 5
    temperature: float = 0.0
    chat_template: bool = True
    seed: int = 0
    dtype: str = "float32"
    output: str = "bench_results"
    name: str | None = None  # JSON file stem; default from suite/engine/method
    # more embedded drafter arms in the same run: (label, spec), label unique among them
    compare: list = field(default_factory=list)
    budget: str = "off"  # embedded drafter arms with the speculation budget: on | off | both

    def run_name(self) -> str:
        if self.name:
            return self.name
        suite = os.path.splitext(os.path.basename(self.suite))[0]
        n = f"k{self.per_category}" if self.per_category else f"n{self.num_prompts or 'all'}"
        return f"{suite}_t{self.turns}_{self.engine}_{self.method}_{n}"


@dataclass
class _ArmState:
    arm: Arm
    stats: SpecStats = field(default_factory=SpecStats)
    requests: list[dict] = field(default_factory=list)  # JSON records, in run order
    outputs: list = field(default_factory=list)  # RequestOutput, same order


def run_bench(cfg: BenchConfig, progress: bool = True, log=print) -> dict:
    import torch
    from transformers.utils import logging as hf_logging
    from specplug.drafters.base import available_methods
    from specplug.models.loading import load_causal_lm, load_tokenizer

    if cfg.turns not in (1, 2):
        raise ValueError(f"--turns must be 1 or 2, got {cfg.turns}")
    for name, v in (("--max-new-tokens", cfg.max_new_tokens), ("--batch-size", cfg.batch_size),
                    ("--gamma", cfg.gamma)):
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
    if cfg.compare and cfg.engine != "embedded":
        raise ValueError("--compare adds embedded arms: use it with --engine embedded")
    hf_logging.disable_progress_bar()  # the bench has its own bar
    model = load_causal_lm(cfg.target, dtype=getattr(torch, cfg.dtype))
    tokenizer = load_tokenizer(cfg.target)
    drafter = None if cfg.method == "none" else DrafterSpec(cfg.method, cfg.drafter, cfg.options)
    target = BenchTarget(cfg.target, model, tokenizer, drafter, cfg.gamma,
                         SamplingParams(temperature=cfg.temperature), cfg.batch_size,
                         list(cfg.compare), cfg.budget)
    engines = [cfg.engine] + (["hf"] if cfg.anchors and cfg.engine != "hf" else [])
    states = [_ArmState(a) for e in engines for a in build_arms(e, target)]
    use_chat = cfg.chat_template and has_chat_template(tokenizer)

    _warm_up(states, tokenizer)
    bar = _progress(sum(min(cfg.turns, len(i.turns)) for i in items) * len(states), progress)
    skipped: list[str] = []
    answers: dict[str, list[str]] = {i.id: [] for i in items}
    limit = context_limit(model.config)
    for turn in range(cfg.turns):
        batch = [i for i in items if turn < len(i.turns) and i.id not in skipped]
        reqs = []
        for k, item in enumerate(batch):
            text = render(tokenizer, item, turn, answers[item.id], use_chat)
            ids = encode(tokenizer, text, use_chat and item.chat)
            if len(ids) + cfg.max_new_tokens + cfg.gamma + 1 > limit:
                skipped.append(item.id)  # too long for the model's context: left out of every arm
                continue
            reqs.append((item, Request(ids, cfg.max_new_tokens, seed=cfg.seed + k, prompt=text)))
        baseline_out = _run_phase(states, reqs, turn, cfg.batch_size, bar)
        for item, out in baseline_out:
            answers[item.id].append(out.output_text)
    if bar is not None:
        bar.close()
    result = _assemble(cfg, states, items, skipped, use_chat)
    for st in states:
        log(st.stats.summary_line(st.arm.label))
    return result


def _run_phase(states: list[_ArmState], reqs, turn: int, batch_size: int, bar):
    """Run every arm on reqs; returns the first arm's (the main baseline's) outputs."""
    chunks = [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]
    in_process = [s for s in states if not s.arm.whole_phase]
    for chunk in chunks:
        for st in in_process:
            outs = st.arm.run([r for _, r in chunk], st.stats)
            _keep(st, chunk, outs, turn)
            if bar is not None:
                bar.set_postfix_str(st.arm.label)
                bar.update(len(chunk))
    for st in (s for s in states if s.arm.whole_phase):
        outs = st.arm.run([r for _, r in reqs], st.stats)
        _keep(st, reqs, outs, turn)
        if bar is not None:
            bar.update(len(reqs))
    main_outs = states[0].outputs[len(states[0].outputs) - len(reqs):]
    return list(zip([item for item, _ in reqs], main_outs))


def _keep(st: _ArmState, chunk, outs, turn: int) -> None:
    st.outputs += outs
    for (item, req), out in zip(chunk, outs):
        st.requests.append({
            "id": item.id, "category": item.category, "turn": turn + 1, "prompt": req.prompt,
            "num_prompt_tokens": len(req.prompt_ids), "output_text": out.output_text,
            "output_token_ids": out.output_token_ids, "num_new_tokens": out.num_new_tokens,
            "accept_lengths": out.accept_lengths, "finish_reason": out.finish_reason})


def _warm_up(states: list[_ArmState], tokenizer) -> None:
    """One short request per in-process arm first, so no arm pays one-off start-up costs."""
    ids = tokenizer("Hello, how are you today?")["input_ids"] or [0]
    for st in states:
        if not st.arm.whole_phase:
            st.arm.run([Request(list(ids), 8, seed=0)], SpecStats())


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
        entry = {"label": st.arm.label, "engine": st.arm.engine, "method": st.arm.method,
                 "role": st.arm.role, "settings": st.arm.settings, "summary": summary,
                 "tau_per_category": metrics.tau_per_category(st.requests),
                 "speedup": _ratio(summary, base.stats.summary() if base else None),
                 "requests": st.requests}
        hf = by_label.get(HF_EQUIVALENT.get(st.arm.method, ""))
        if st.arm.engine != "hf" and hf is not None:
            entry["hf_equivalent"] = hf.arm.label
            entry["speedup_vs_hf_equivalent"] = _ratio(summary, hf.stats.summary())
        if base is not None and st is not base:
            entry["matches_baseline"] = sum(
                a["output_token_ids"] == b["output_token_ids"]
                for a, b in zip(st.requests, base.requests))
            if summary["num_draft_tokens"]:
                c = metrics.draft_cost(summary, base.stats.summary(), cfg.gamma)
                entry["leviathan"] = metrics.leviathan_bound(summary["acceptance_rate"], cfg.gamma, c)
        arms.append(entry)
    head = next((a for a in arms if a["role"] == "spec"), None) or next(
        (a for a in arms if a["role"] == "anchor"), arms[0])
    config = asdict(cfg)
    config.update({"engines": sorted({s.arm.engine for s in states}), "chat_template_used": use_chat,
                   "num_items": len(items), "skipped_too_long": skipped})
    return {
        "schema": SCHEMA, "name": cfg.run_name(), "headline": head["label"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": head["summary"], "requests": head["requests"],
        "speedup": head["speedup"], "tau_per_category": head["tau_per_category"],
        "leviathan": head.get("leviathan"),
        "config": config, "environment": metrics.environment(), "arms": arms,
    }


def _ratio(summary: dict, base: dict | None) -> float | None:
    if not base or not base["tokens_per_second"]:
        return None
    return round(summary["tokens_per_second"] / base["tokens_per_second"], 4)


def write_json(result: dict, out_dir: str) -> str:
    """Write atomically: a crash never leaves a half-written JSON for the report to read."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, result["name"] + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return path
