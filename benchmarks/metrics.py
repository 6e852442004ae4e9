"""Numbers derived from an arm's stats: speedup, tau per category, the Leviathan bound, and the
environment a run was measured in."""
from __future__ import annotations

import os
import platform
import sys
from collections import defaultdict


def expected_accept_length(alpha: float, gamma: float) -> float:
    """Leviathan et al. (2023) eq. 1: E[tokens per verify step] = (1 - a^(g+1)) / (1 - a),
    with a the per-draft-token acceptance rate and g drafts per step."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def leviathan_bound(alpha: float, gamma: int, draft_cost: float) -> dict:
    """Speedup bound E / (g c + 1), c = one draft token's cost relative to one target step.
    It assumes g drafts every step and a verify pass as cheap as a plain step."""
    e = expected_accept_length(alpha, gamma)
    return {"alpha": round(alpha, 4), "gamma": gamma, "draft_cost": round(draft_cost, 5),
            "expected_accept_length": round(e, 4),
            "speedup_bound": round(e / (gamma * draft_cost + 1.0), 4)}


def decode_ms_per_step(summary: dict) -> float:
    """Decode time (all but prefill) per verify step; 0 when the arm took no step."""
    steps = sum(int(v) for v in summary.get("accept_length_histogram", {}).values())
    t = summary["timing_ms"]
    decode = sum(t.values()) - t.get("prefill", 0.0)
    return decode / steps if steps else 0.0


def draft_cost(spec_summary: dict, base_summary: dict, gamma: int) -> float:
    """c: draft time per draft token (draft ms / steps / gamma) over the plain arm's step time."""
    steps = sum(int(v) for v in spec_summary.get("accept_length_histogram", {}).values())
    base_step = decode_ms_per_step(base_summary)
    if not steps or not base_step or not gamma:
        return 0.0
    return spec_summary["timing_ms"].get("draft", 0.0) / steps / gamma / base_step


def spread(per_rep: list[float]) -> dict:
    """min/median/max of one ratio over a run's repetitions, and the values in run order."""
    ordered = sorted(per_rep)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"min": round(ordered[0], 4), "median": round(median, 4), "max": round(ordered[-1], 4),
            "per_rep": [round(x, 4) for x in per_rep]}


def tau_per_category(requests: list[dict]) -> dict[str, float]:
    """Mean accept length over all verify steps of each category's requests."""
    steps: dict[str, list[int]] = defaultdict(list)
    for r in requests:
        steps[r.get("category", "all")] += r["accept_lengths"]
    return {c: round(sum(v) / len(v), 4) for c, v in sorted(steps.items()) if v}


def environment() -> dict:
    import torch
    import transformers
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        from importlib.metadata import version
        versions["specplug"] = version("specplug")
    except Exception:  # running from a source tree without metadata
        versions["specplug"] = "source"
    for name in ("vllm", "sglang"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return {
        "versions": versions,
        "threads": {"torch": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "cpu_count": os.cpu_count()},
        "device": {"type": "cuda" if torch.cuda.is_available() else "cpu",
                   "cpu": _cpu_name(), "cpu_family_model": _cpu_field(("cpu family", "model")),
                   "cpu_vector_flags": cpu_vector_flags(), "platform": platform.platform()},
    }


def _cpu_field(keys: tuple[str, ...]) -> str:
    """'23/1' for cpu family 23, model 1: "AMD EPYC" alone names several generations."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys and key.strip() not in found:
                    found[key.strip()] = value.strip()
    except OSError:
        return "unknown"
    return "/".join(found.get(k, "?") for k in keys)


def cpu_vector_flags() -> list[str]:
    """The vector extensions CPU matmuls depend on (bf16 runs several times slower without
    avx512_bf16 / amx_bf16, so numbers from different hosts compare only with these alike)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
