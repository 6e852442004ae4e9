"""The `vllm.general_plugins` entry point (setup.py: specplug=...plugin:register).

vLLM calls `register()` in every process it starts (main, engine core, workers), possibly more
than once.  It checks the vLLM version and the interfaces specplug relies on (compat.py); on a
mismatch it logs why and registers nothing, so vLLM keeps serving without specplug.  Token-only
drafters need no registration (vLLM imports the custom_class proposer by path); drafters that
read target hidden states register their model classes under an existing vLLM family here.
"""
from __future__ import annotations

import logging
import multiprocessing
import os

LOGGER_NAME = "specplug.vllm"

# (architecture name, "module:Class") for drafters vLLM drives as one of its own families.
# EAGLEConfig keeps architecture names that start with Eagle3/DFlash, so the built-in proposers
# pick these up from a checkpoint's config.json.
MODEL_CLASSES: tuple[tuple[str, str], ...] = ()

_registered: list[str] | None = None  # what this process registered; None = not yet run


def plugin_logger() -> logging.Logger:
    """A logger with its own stderr handler: vLLM loads plugins in the main process before it
    configures its own logging, so a child of vLLM's logger would drop our INFO lines there."""
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(levelname)s [specplug] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    return log


def register() -> None:
    global _registered
    log = plugin_logger()
    where = f"{multiprocessing.current_process().name} pid={os.getpid()}"
    if _registered is not None:
        return
    from . import compat
    found = compat.problems()
    if found:
        _registered = []
        log.warning("specplug plugin registered nothing in %s: %s", where, "; ".join(found))
        return
    from vllm import ModelRegistry

    from .cpu_sampling_fix import repair_after_platform_overrides
    repair = repair_after_platform_overrides()  # T > 0 on CPU, see cpu_sampling_fix.py
    names = []
    for arch, target in MODEL_CLASSES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
        names.append(arch)
    _registered = names
    log.info("specplug plugin loaded in %s for vLLM %s: custom_class proposer %s; model classes: "
             "%s; %s", where, compat.vllm_version(),
             "specplug.integrations.vllm.proposer.SpecplugProposer", ", ".join(names) or "none",
             repair)
