"""The engines besides the embedded one, as runners their integrations register.

`specplug generate --engine vllm|sglang` looks the runner up here.  Each integration's generate
module registers its runner when imported, and the core names only the module to import: no
integration imports `specplug.api`, so no import cycle runs between them.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

# engine -> the module whose import registers its runner
RUNNER_MODULES = {"vllm": "specplug.integrations.vllm.generate",
                  "sglang": "specplug.integrations.sglang.generate"}
_RUNNERS: dict[str, Callable] = {}


def register_runner(engine: str, run: Callable) -> None:
    """run(cfg: GenerateConfig) -> (list[RequestOutput], SpecStats)."""
    _RUNNERS[engine] = run


def runner(engine: str) -> Callable:
    if engine not in RUNNER_MODULES:
        raise ValueError(f"unknown engine {engine!r}; known: embedded, {', '.join(RUNNER_MODULES)}")
    if importlib.util.find_spec(engine) is None:
        raise RuntimeError(f"--engine {engine} needs {engine} in this Python: "
                           f"pip install 'specplug[{engine}]'")
    if engine not in _RUNNERS:
        importlib.import_module(RUNNER_MODULES[engine])
    return _RUNNERS[engine]
