"""The one Drafter interface and the registry that maps method names to drafter factories."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..types import DraftInput, DraftProposal, DrafterNeeds


@dataclass
class TargetInfo:
    """What a drafter may borrow from the target, whichever engine runs it."""
    config: Any  # the target's HF config
    tokenizer: Any = None  # HF tokenizer, needed by drafters with another tokenizer
    embed_tokens: torch.nn.Module | None = None  # shared by EAGLE/DFlash heads
    lm_head: torch.nn.Module | None = None
    final_norm: torch.nn.Module | None = None
    dtype: torch.dtype = torch.float32
    # where the target runs: every drafter keeps its weights, caches and per-step tensors here
    device: torch.device = torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


class Drafter(ABC):
    """Proposes draft tokens for a batch of rows; keeps whatever per-row state it wants.

    A drafter reconciles its state with `DraftInput.token_ids` on every call (e.g. crops its KV
    cache to the longest prefix it shares with the committed tokens), so engines never tell it
    what was accepted: rollback falls out of the committed tokens themselves.
    """
    needs: DrafterNeeds = DrafterNeeds()

    @abstractmethod
    def propose(self, inp: DraftInput) -> DraftProposal:
        """Draft tokens after each row's last committed token (target vocabulary)."""

    def release(self, row_ids: list[int]) -> None:
        """Forget finished rows."""


@dataclass
class DrafterSpec:
    method: str
    path: str | None = None  # checkpoint folder, when the method has weights
    options: dict = field(default_factory=dict)  # method-specific settings (tree sizes, k, ...)


_REGISTRY: dict[str, Callable[[DrafterSpec, TargetInfo], Drafter]] = {}


def register_drafter(method: str):
    def deco(factory):
        _REGISTRY[method] = factory
        return factory
    return deco


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_drafter(spec: DrafterSpec, target: TargetInfo) -> Drafter:
    _load_builtin()
    if spec.method not in _REGISTRY:
        raise ValueError(f"unknown method {spec.method!r}; known: none, {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[spec.method](spec, target)


def _load_builtin() -> None:
    # importing the family modules runs their @register_drafter; kept lazy so importing the
    # core costs nothing
    import importlib
    for name in BUILTIN_FAMILIES:
        try:
            importlib.import_module(f"specplug.drafters.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"specplug.drafters.{name}":
                raise


BUILTIN_FAMILIES = ("ngram", "suffix", "draft_model", "eagle", "eagle3", "dflash", "specdiff",
                    "hybrid")
