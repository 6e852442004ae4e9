"""`specplug bench sweep --batch-sizes 1,4,10,32 ...`: the same arms at several batch sizes.

One ordinary bench run per batch size (arms interleaved, repetitions, JSON named
`<stem>_b<batch>.json`), each recording the sweep it belongs to, so `specplug bench report`
can lay the speedups out against batch size: a table and a plot per sweep.
"""
from __future__ import annotations

import dataclasses
import os

from .runner import BenchConfig


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: expected batch sizes >= 1")
    return sorted(set(sizes))


def sweep_configs(cfg: BenchConfig, batch_sizes: list[int]) -> list[BenchConfig]:
    """One config per batch size.  Unless --block says otherwise, an arm's turn is four
    batches' worth of requests: engines batch continuously, so a finished row's place goes to a
    waiting request, and a block of one batch would leave none waiting."""
    stem = cfg.run_name()
    return [dataclasses.replace(cfg, batch_size=b, block=cfg.block or 4 * b, name=f"{stem}_b{b}",
                                sweep=stem)
            for b in batch_sizes]


def sweeps(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by the sweep they belong to, each group by batch size."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        name = run["config"].get("sweep")
        if name:
            out.setdefault(name, []).append(run)
    return {k: sorted(v, key=lambda r: r["config"]["batch_size"]) for k, v in sorted(out.items())}


def _cell(arm: dict | None) -> str:
    if arm is None:
        return "–"
    spread = arm.get("speedup_spread") or {}
    tau = arm["summary"]["mean_accept_length"] if arm["summary"]["num_draft_tokens"] else None
    text = (f"{spread['median']:.3f}× ({spread['min']:.3f}–{spread['max']:.3f})" if spread
            else f"{arm['speedup']:.3f}×")
    return text + (f", τ {tau:.2f}" if tau else ", no drafts")


def sweep_table(runs: list[dict]) -> str:
    """Per sweep: one row per drafting arm, one column per batch size (speedup over the same
    batch size's plain run, median (min–max) of the repetitions, and τ)."""
    from .report import gamma_text  # report imports this module
    parts = []
    for name, group in sweeps(runs).items():
        sizes = [r["config"]["batch_size"] for r in group]
        labels = []
        for run in group:
            labels += [a["label"] for a in run["arms"]
                       if a["role"] != "baseline" and a["label"] not in labels]
        cfg = group[0]["config"]
        prompts = len(group[0]["arms"][0]["requests"])
        lines = [f"`{name}`: {prompts} prompts × {cfg['max_new_tokens']} new tokens, "
                 f"{cfg['dtype']}, {gamma_text(group[0])}, {cfg['repeats']} repetitions; "
                 "speedup over plain decoding at the same batch size:", "",
                 "| arm | " + " | ".join(f"batch {b}" for b in sizes) + " |",
                 "|" + "---|" * (len(sizes) + 1)]
        for label in labels:
            cells = [_cell(next((a for a in r["arms"] if a["label"] == label), None))
                     for r in group]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "(no batch sweeps yet)"


def plot_sweeps(runs: list[dict], out_dir: str) -> list[str]:
    """Speedup against batch size, one line per arm (median, min–max as error bars)."""
    from .plots import _plt, _save
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, group in sweeps(runs).items():
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = sorted({a["label"] for r in group for a in r["arms"] if a["role"] != "baseline"})
        for label in labels:
            xs, mid, lo, hi = [], [], [], []
            for run in group:
                arm = next((a for a in run["arms"] if a["label"] == label), None)
                if arm is None:
                    continue
                s = arm.get("speedup_spread") or {"median": arm["speedup"],
                                                  "min": arm["speedup"], "max": arm["speedup"]}
                xs.append(run["config"]["batch_size"])
                mid.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over plain (same batch size)")
        ax.set_title(f"{name}: speedup against batch size")
        ax.legend(fontsize=7)
        paths.append(_save(fig, os.path.join(out_dir, f"{name}_speedup_vs_batch.png")))
    return paths
