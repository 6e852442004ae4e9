"""The drafter block both engine plugins read, in one schema:

    {"method": "suffix", "path": "/drafters/head", "options": {"tree_nodes": 16}, "budget": true}

vLLM:   LLM(..., additional_config={"specplug": BLOCK})        (integrations/vllm/proposer.py)
SGLang: BLOCK as specplug.json in the --speculative-draft-model-path folder
        (integrations/sglang/drafter_card.py), where "method" may be left to the algorithm name.

Options reach the drafter through the engine's own configuration, never through the environment.
"""
from __future__ import annotations

from dataclasses import dataclass

from .drafters.base import DrafterSpec, option_is_set

KEYS = ("method", "path", "options", "budget")


@dataclass(frozen=True)
class DrafterBlock:
    method: str | None  # None: the engine names it (SGLang's --speculative-algorithm)
    path: str | None  # the drafter's checkpoint folder, for families with weights
    options: dict  # the drafter's own options (tree sizes, lookup, ...)
    budget: bool  # the speculation budget picks each step's draft length

    def spec(self) -> DrafterSpec:
        return DrafterSpec(self.method or "", self.path, dict(self.options))

    def to_dict(self) -> dict:
        out = {"method": self.method, "path": self.path, "options": dict(self.options),
               "budget": self.budget}
        return {k: v for k, v in out.items() if v is not None}


def parse_block(block, where: str, method_required: bool = True) -> DrafterBlock:
    """A block as JSON gave it -> DrafterBlock; a one-line error naming `where` otherwise."""
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be a JSON object with keys {', '.join(KEYS)}, "
                         f"got {type(block).__name__}")
    unknown = sorted(set(block) - set(KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known: {', '.join(KEYS)}")
    method = block.get("method")
    if method is not None and (not isinstance(method, str) or not method):
        raise ValueError(f"{where}: 'method' must be a method name, got {method!r}")
    if method_required and not method:
        raise ValueError(f"{where} needs 'method' (the specplug drafter to run)")
    path = block.get("path")
    if path is not None and not isinstance(path, str):
        raise ValueError(f"{where}: 'path' must be a folder, got {path!r}")
    options = block.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}: 'options' must be a JSON object, got {options!r}")
    budget = option_is_set(block.get("budget", False), f"{where} 'budget'")
    return DrafterBlock(method or None, path or None, dict(options), budget)
