"""PNG plots of one saved run (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import os


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    # no timestamp/version metadata, so the same JSON always gives the same file
    fig.savefig(path, dpi=100, metadata={"Software": None})
    _plt().close(fig)
    return path


def plot_run(run: dict, out_dir: str) -> list[str]:
    """accept-length histogram, tokens/s + speedup per arm, tau per category -> PNG paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, run["name"])
    paths = [_accept_histogram(run, stem + "_accept_hist.png"),
             _throughput(run, stem + "_throughput.png")]
    if any(len(a["tau_per_category"]) > 1 for a in _drafting(run)):
        paths.append(_tau_categories(run, stem + "_tau_category.png"))
    return paths


def _drafting(run: dict) -> list[dict]:
    return [a for a in run["arms"] if a["summary"]["num_draft_tokens"]]


def _accept_histogram(run: dict, path: str) -> str:
    plt = _plt()
    arms = _drafting(run)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(arms))
    for k, arm in enumerate(arms):
        hist = {int(n): c for n, c in arm["summary"]["accept_length_histogram"].items()}
        total = sum(hist.values()) or 1
        xs = sorted(hist)
        ax.bar([x + (k - (len(arms) - 1) / 2) * width for x in xs],
               [hist[x] / total for x in xs], width, label=arm["label"])
    ax.set_xlabel("accept length (accepted drafts + 1)")
    ax.set_ylabel("fraction of verify steps")
    ax.set_title(f"{run['name']}: accept lengths")
    if arms:
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _throughput(run: dict, path: str) -> str:
    plt = _plt()
    arms = run["arms"]
    labels = [a["label"] for a in arms]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [a["summary"]["tokens_per_second"] for a in arms], color="tab:blue")
    left.set_ylabel("tokens / s")
    left.set_title("throughput")
    # the bar is the median over repetitions, the whisker its min..max
    mids = [a["speedup"] or 0.0 for a in arms]
    spreads = [a.get("speedup_spread") or {} for a in arms]
    err = [[m - sp.get("min", m) for m, sp in zip(mids, spreads)],
           [sp.get("max", m) - m for m, sp in zip(mids, spreads)]]
    right.bar(labels, mids, color="tab:green", yerr=err, capsize=4)
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_ylabel("speedup vs plain (median, min..max)")
    right.set_title("speedup")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(run["name"])
    fig.tight_layout()
    return _save(fig, path)


def _tau_categories(run: dict, path: str) -> str:
    plt = _plt()
    arms = _drafting(run)
    cats = sorted({c for a in arms for c in a["tau_per_category"]})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(arms))
    for k, arm in enumerate(arms):
        ax.bar([i + (k - (len(arms) - 1) / 2) * width for i in range(len(cats))],
               [arm["tau_per_category"].get(c, 0.0) for c in cats], width, label=arm["label"])
    ax.set_xticks(range(len(cats)), cats, rotation=30)
    ax.set_ylabel("tau (mean accept length)")
    ax.set_title(f"{run['name']}: tau per category")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
