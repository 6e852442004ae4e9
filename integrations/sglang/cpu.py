"""SGLang on a machine without a GPU: where specplug's CPU stand-ins live and how to turn them on.

SGLang 0.5.23 runs on CPU (SGLANG_USE_CPU_ENGINE=1), but its speculative path there needs pieces
its PyPI install lacks.  `cpu_standins/` holds specplug's replacements, all pure torch/Python:
  sgl_kernel/        the ops SGLang imports from its CPU kernel build: tree building, greedy tree
                     verify, KV copies, and the intel_amx backend's decode/extend attention
                     (written as loops: correct, not fast)
  sitecustomize.py   tells SGLang's intel_amx backend the CPU has AMX (else SGLang falls back to
                     torch_native attention, where speculative decoding does not run), and has
                     SGLang fork its scheduler and detokenizer instead of spawning them (a
                     spawned child imports SGLang and torch again); active only with
                     SGLANG_USE_CPU_ENGINE=1
  torchvision/       placeholders for the names SGLang's multimodal processors import (the PyPI
                     torchvision wheel is a CUDA build); text-only models never use them
They act through PYTHONPATH, so that every process SGLang starts (scheduler, detokenizer) gets
them.  specplug puts them there itself (`cpu_env`) for `specplug generate/bench --engine sglang`
and for the server launcher (launch_cpu.py); nobody sets PYTHONPATH by hand.
"""
from __future__ import annotations

import os
import sys

STANDINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_standins")


def on_cpu() -> bool:
    """Whether SGLang should run on the CPU here: SGLANG_USE_CPU_ENGINE when set, else no GPU."""
    chosen = os.environ.get("SGLANG_USE_CPU_ENGINE")
    if chosen is not None:
        return chosen == "1"
    import torch
    return not torch.cuda.is_available()


def cpu_env(base: dict | None = None) -> dict:
    """A copy of `base` (default os.environ) in which SGLang runs on the CPU with the stand-ins."""
    env = dict(os.environ if base is None else base)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != STANDINS]
    env["PYTHONPATH"] = os.pathsep.join([STANDINS, *paths])
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


def standins_active() -> bool:
    """Whether this very process started with the stand-ins (in-process SGLang can use them)."""
    return os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" and STANDINS in sys.path
