"""The `sglang.srt.plugins` entry point (setup.py: specplug=...plugin:register).

SGLang calls `register()` in every process it starts (launcher, tokenizer, scheduler,
detokenizer), before server args are parsed.  It checks the SGLang version and the interfaces the
adapter relies on (compat.py); on a mismatch it logs why and registers nothing, so SGLang keeps
serving without specplug and an unknown algorithm name fails with SGLang's own message.
Otherwise it registers the names in algorithms.ALGORITHMS with `SpeculativeAlgorithm.register`.
"""
from __future__ import annotations

import logging
import os

LOGGER_NAME = "specplug.sglang"

_registered: list[str] | None = None  # what this process registered; None = not yet run


def plugin_logger() -> logging.Logger:
    """A logger with its own stderr handler: plugins load before SGLang configures logging."""
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s [specplug] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(os.environ.get("SPECPLUG_LOG_LEVEL", "INFO").upper())
    return log


def register() -> list[str]:
    """Register specplug's algorithms with SGLang once per process; returns their names."""
    global _registered
    if _registered is not None:
        return _registered
    log = plugin_logger()
    from . import compat
    found = compat.problems()
    if found:
        _registered = []
        log.warning("specplug plugin registered nothing in pid %d: %s", os.getpid(),
                    "; ".join(found))
        return _registered

    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    from .algorithms import ALGORITHMS, spec_class
    algo_class = spec_class()
    names = []
    for name in ALGORITHMS:
        if get_spec(name) is None:  # SGLang may reload plugins in a process that has them
            SpeculativeAlgorithm.register(name, supports_overlap=False,
                                          spec_class=algo_class)(_worker_class)
        names.append(name)
    _registered = names
    log.info("specplug plugin loaded in pid %d for SGLang %s: %s", os.getpid(),
             compat.sglang_version(), ", ".join(names))
    return names


def _worker_class(server_args):
    # imported only where a worker is built (the scheduler): it pulls in SGLang's model code
    from .worker import SpecplugWorker
    return SpecplugWorker
